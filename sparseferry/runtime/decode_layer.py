"""A decode step of a Llama-family decoder layer on the CPU in a dozen native calls.

transformers' decoder layer runs about a hundred tensor operations around its seven matrix
products: views and transposes, the rotary embedding (rotate_half's slices and cat), the cache,
the attention interface, SiLU, the products and residual adds, each a dispatch of several
microseconds, plus a module call per submodule. At a decode step of a 1.1B Llama on a 2-core CPU
that is more than a millisecond a layer, a third of the token. `patch(model)` gives the decoder
layers of the classes in CLASSES (the layer forward of Llama, Mistral, Qwen2, Qwen3) a forward
that, for a few bf16 rows, runs the same computation as

    x = norm1(h);  q, k, v = x Wq, x Wk, x Wv  (Qwen3: q_norm, k_norm per head)
    q, k = rope(q), rope(k);  keys, values = cache.update(k, v)
    h = h + attention(q, keys, values, mask) Wo
    x = norm2(h);  h = h + (silu(x Wg) * (x Wu)) Wd

with the fused sparse matvec for each product (the bitmap, or the module's own forward for a dense
weight), the model's own attention function (torch's SDPA) and one native call (csrc/decode.c) for
each of rope, silu * up and the adds, rounding to bf16 where transformers rounds. Anything else (prefills beyond MATVEC_MAX_BATCH rows,
other dtypes, attention outputs asked for, an unknown keyword argument) runs the layer's own forward.

Each layer's first such step is checked: the fast step runs without touching the cache (its keys are
the cache's plus the new ones), the layer's own forward runs as usual, and the fast forward is kept
only if the two outputs agree within AGREE_REL (they are the same but for the order of an RMSNorm's
sum of squares and the last bit of an exponential: rarely a bf16 step). A layer that disagrees keeps
its own forward.
"""
from __future__ import annotations

import types
import weakref

import torch
from torch import nn

from .. import kernels
from ..kernels import int8_activations, kernel_path, native
from . import attention

CLASSES = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"})
ATTENTION_IMPLEMENTATIONS = frozenset({"sdpa", attention.NAME})
_LAYER_KWARGS = frozenset({"hidden_states", "attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
                           "cache_position", "position_embeddings"})
AGREE_REL = 2.0**-7  # |fast - own| / |own| (L2) at the first step, a few bf16 steps in a few elements


def patchable(layer: nn.Module) -> bool:
    """A decoder layer whose forward this module computes: one of CLASSES, with its usual parts."""
    if type(layer).__name__ not in CLASSES or "forward" in layer.__dict__:
        return False
    at, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if at is None or mlp is None:
        return False
    parts = [getattr(at, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    parts += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    head_dim = getattr(at, "head_dim", None)
    return (all(type(p) is nn.Linear for p in parts) and isinstance(head_dim, int) and 0 < head_dim <= 512 and head_dim % 2 == 0
            and isinstance(getattr(mlp, "act_fn", None), nn.SiLU | _silu_activation())
            and isinstance(getattr(at, "scaling", None), float) and isinstance(getattr(at, "layer_idx", None), int)
            and (getattr(at, "q_norm", None) is None) == (getattr(at, "k_norm", None) is None))


def _silu_activation() -> type:
    try:
        from transformers.activations import SiLUActivation
    except ImportError:  # older transformers: ACT2FN["silu"] is nn.SiLU
        return nn.SiLU
    return SiLUActivation


def patch(model: nn.Module, layers) -> int:
    """Give the patchable layers of `layers` the fast decode forward (see above); returns how many."""
    if native._native is None or model.config._attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        return 0
    n = 0
    for layer in layers:
        if patchable(layer):
            layer._sf_layer_forward = layer.forward
            layer._sf_layer_checked = False
            layer.forward = types.MethodType(_forward, layer)
            n += 1
    return n


def agree(got: torch.Tensor, want: torch.Tensor) -> bool:
    """got is want within AGREE_REL (relative L2), with the same shape and non-finite elements."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    g, w = got.float(), want.float()
    fin = w.isfinite()
    if not torch.equal(fin, g.isfinite()):
        return False
    return bool((g[fin] - w[fin]).norm() <= AGREE_REL * w[fin].norm() + 1e-30)


def _inputs(layer, args, kwargs):
    """(hidden, mask, cache, cos, sin, attention kwargs) of a call the fast step computes, else None."""
    if len(args) > 1 or not _LAYER_KWARGS.issuperset(kwargs):
        return None
    h = args[0] if args else kwargs.get("hidden_states")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    pe = kwargs.get("position_embeddings")
    if (not isinstance(h, torch.Tensor) or h.dtype != torch.bfloat16 or h.device.type != "cpu" or h.dim() != 3
            or not 0 < h.shape[0] * h.shape[1] <= kernels.MATVEC_MAX_BATCH or not h.is_contiguous()
            or (h.requires_grad and torch.is_grad_enabled())  # the native pieces have no backward
            or cache is None or not hasattr(cache, "update") or not isinstance(pe, tuple | list) or len(pe) != 2):
        return None
    cos, sin = pe
    hd = layer.self_attn.head_dim
    b, t, _ = h.shape
    for c in (cos, sin):
        if (not isinstance(c, torch.Tensor) or c.dtype != torch.bfloat16 or c.dim() != 3 or c.shape[0] not in (1, b)
                or tuple(c.shape[1:]) != (t, hd) or not c.is_contiguous() or c.device.type != "cpu"):
            return None
    mask = kwargs.get("attention_mask")
    if mask is not None and not isinstance(mask, torch.Tensor):
        return None
    akw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "attention_mask", "cache", "past_key_values",
                                                        "position_embeddings")}
    return h, mask, cache, cos, sin, akw


def _forward(self: nn.Module, *args, **kwargs):
    inp = _inputs(self, args, kwargs)
    path = kernel_path("cpu") if inp is not None else None
    if path not in native.PATHS:
        return self._sf_layer_forward(*args, **kwargs)
    h, mask, cache, cos, sin, akw = inp
    idx = self.self_attn.layer_idx
    if not self._sf_layer_checked:
        cl = getattr(cache, "layers", None)
        cl = cl[idx] if isinstance(cl, list) and idx < len(cl) else None
        if type(cl).__name__ != "DynamicLayer":  # the check needs a cache it can read without changing
            return self._sf_layer_forward(*args, **kwargs)

        def peek(k, v):
            if not cl.is_initialized or cl.keys is None or cl.keys.numel() == 0:
                return k, v
            return torch.cat([cl.keys, k], dim=-2), torch.cat([cl.values, v], dim=-2)

        got = step(self, h, mask, cos, sin, peek, akw, path)
        want = self._sf_layer_forward(*args, **kwargs)
        if not agree(got, want):
            del self.forward  # computes something else: its own forward from now on
        else:
            self._sf_layer_checked = True
        return want
    return step(self, h, mask, cos, sin, lambda k, v: cache.update(k, v, idx, kwargs=akw), akw, path)


def _norm(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if getattr(mod, "_sf_norm_checked", False):  # runtime/norms.py: native and checked against its own forward
        return native.rms_norm_bf16(x, mod.weight, getattr(mod, mod._sf_norm_eps))
    return mod(x)


def _linear(mod: nn.Linear, x: torch.Tensor, path: str, threads: int) -> torch.Tensor:
    """x [n, cols] @ W.T (+ bias) in bf16: the fused matvec from the bitmap the pipeline handed over
    (checked once per matrix), or the module's own forward for a dense weight."""
    bt = mod.__dict__.get("_sf_bitmap")
    if bt is None:
        return mod(x)
    int8_x = int8_activations(bt, path, x.dtype)
    prep = mod.__dict__.get("_sf_prepared")
    if prep is None or prep[0]() is not bt or prep[1] != (path, int8_x):
        # a weak reference: a streamed bitmap is not kept alive past its layer's forward
        prep = (weakref.ref(bt), (path, int8_x), native.prepare_matvec(bt, path=path, int8_x=int8_x))
        mod._sf_prepared = prep
    bias = mod.bias
    if bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous() and bias.device.type == "cpu"):
        return native.matvec_prepared(prep[2], x, threads=threads, bf16_out=True, bias=bias)
    return (native.matvec_prepared(prep[2], x, threads=threads) + bias.float()).to(x.dtype)


def _attend(at: nn.Module, q, keys, values, mask, akw) -> torch.Tensor:
    """The model's attention (torch's SDPA: `attention.sparseferry_sdpa` packs the grouped query heads
    of a single-token step) of q [b, t, hq, d] against the cache's keys / values: [b, t, hq, d]."""
    b, t, hq, d = q.shape
    if (t == 1 and hq % keys.shape[1] == 0 and keys.shape[-1] == d and values.shape[-1] == d
            and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[-1] == keys.shape[2]))):
        return attention.packed_step(q, keys, values, mask, at.scaling)  # sparseferry_sdpa's, without the interface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fn = ALL_ATTENTION_FUNCTIONS[at.config._attn_implementation]
    out, _ = fn(at, q.transpose(1, 2), keys, values, mask, dropout=0.0, scaling=at.scaling,
                sliding_window=getattr(at, "sliding_window", None), **akw)
    return out


def step(layer: nn.Module, h: torch.Tensor, mask, cos, sin, kv, akw, path: str) -> torch.Tensor:
    """The layer's forward on h [b, t, hidden] (bf16, b * t <= MATVEC_MAX_BATCH) with the native kernel
    path `path`; kv(k, v) takes the new keys / values [b, hkv, t, d] and returns the whole sequence's
    (the cache's update)."""
    at, mlp = layer.self_attn, layer.mlp
    b, t, hidden = h.shape
    n, hd = b * t, at.head_dim
    threads = torch.get_num_threads()
    x = _norm(layer.input_layernorm, h).view(n, hidden)
    q = _linear(at.q_proj, x, path, threads).view(b, t, -1, hd)
    k = _linear(at.k_proj, x, path, threads).view(b, t, -1, hd)
    v = _linear(at.v_proj, x, path, threads).view(b, t, -1, hd)
    if getattr(at, "q_norm", None) is not None:  # Qwen3: RMSNorm of each head before the rotation
        q, k = _norm(at.q_norm, q).contiguous(), _norm(at.k_norm, k).contiguous()
    native.rope_bf16(q, cos, sin)
    native.rope_bf16(k, cos, sin)
    keys, values = kv(k.transpose(1, 2), v.transpose(1, 2))
    o = _attend(at, q, keys, values, mask, akw).reshape(n, -1).contiguous()
    h = native.add_bf16(h.view(n, hidden), _linear(at.o_proj, o, path, threads))
    x = _norm(layer.post_attention_layernorm, h)
    a = native.silu_mul_bf16(_linear(mlp.gate_proj, x, path, threads), _linear(mlp.up_proj, x, path, threads))
    return native.add_bf16(h, _linear(mlp.down_proj, a, path, threads)).view(b, t, hidden)
