"""The KV cache of the sequences in flight, and the attention that reads it.

Continuous batching packs the new tokens of every active sequence into one row: a forward pass
sees `input_ids` of shape [1, N] (N = the sum of each sequence's new tokens this step) with
explicit `position_ids`, and transformers' own model code computes every projection, norm and MLP
for all N tokens at once, so each streamed layer is read once per step for all sequences.
Attention is the one place where sequences must not mix: `varlen_attention` is registered with
transformers' attention interface and, for each sequence's segment of the row, appends the new
keys/values to that sequence's cache and attends over its own past only, with exactly the shapes
the sequence would have alone.

Each sequence owns one `SequenceKV`: per decoder layer a [2, kv_heads, capacity, head_dim]
tensor, sized at admission for prompt + max_tokens, so the bytes a request can ever hold are known
before it starts (`kv_bytes_per_token`) and admission control can keep the sum under the budget.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_NAME = "sparseferry_varlen"
_state = threading.local()  # .step: the StepLayout of the forward pass running on this thread


class KVCacheError(RuntimeError):
    """The model's attention does not match what the KV cache was sized for (a bug, not bad input)."""


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype.itemsize


def kv_shape(config, num_layers: int, dtype: torch.dtype) -> KVShape:
    """Keys/values per token from a transformers config (GQA heads where the config has them)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = next(getattr(text, k) for k in ("num_attention_heads", "n_head", "num_heads") if getattr(text, k, None))
    hidden = next(getattr(text, k) for k in ("hidden_size", "n_embd", "d_model") if getattr(text, k, None))
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return KVShape(layers=num_layers, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)


class SequenceKV:
    """One sequence's keys and values for every layer: [2, kv_heads, capacity, head_dim] each."""

    def __init__(self, shape: KVShape, capacity: int, device: torch.device):
        self.shape, self.capacity = shape, capacity
        self.length = 0  # positions whose keys/values are stored (committed after each forward pass)
        self.layers = [torch.empty((2, shape.kv_heads, capacity, shape.head_dim), dtype=shape.dtype, device=device)
                       for _ in range(shape.layers)]

    @property
    def nbytes(self) -> int:
        return self.capacity * self.shape.bytes_per_token


@dataclass
class Segment:
    kv: SequenceKV
    start: int  # offset of this sequence's first new token in the packed row
    length: int  # new tokens of this sequence in the row


class StepLayout:
    """The packed row of one forward pass: which tokens belong to which sequence."""

    def __init__(self, segments: list[Segment], layer_index: dict[int, int]):
        self.segments = segments
        self._layer_index = layer_index  # id(attention module) -> decoder layer, for modules without layer_idx

    def layer_of(self, module) -> int:
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            idx = self._layer_index.setdefault(id(module), len(self._layer_index))
        return idx

    def __enter__(self):
        _state.step = self
        return self

    def __exit__(self, *exc):
        _state.step = None
        if exc[0] is None:
            for s in self.segments:
                s.kv.length += s.length


def _causal_mask(past: int, t: int, window: int | None, device) -> torch.Tensor | None:
    """[t, past + t] bool: query i (at position past + i) sees key j iff j <= past + i (and within the window)."""
    if t == 1 and (window is None or past < window):
        return None
    q = torch.arange(t, device=device)[:, None] + past
    k = torch.arange(past + t, device=device)[None, :]
    m = k <= q
    if window is not None:
        m &= k > q - window
    return m


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention-interface function; query [1, H, N, D], key/value [1, Hkv, N, D] -> [1, N, H, D].

    Outside a batched step (plain `model(...)` / `generate`) it is transformers' SDPA attention.
    """
    step = getattr(_state, "step", None)
    if step is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise KVCacheError("attention softcapping / sinks are not supported by the batched server")
    layer = step.layer_of(module)
    window = kwargs.get("sliding_window")
    heads, kv_heads = query.shape[1], key.shape[1]
    out = []
    for s in step.segments:
        cache = s.kv.layers[layer]  # [2, Hkv, capacity, D]
        past, t = s.kv.length, s.length
        if key.shape[1] != cache.shape[1] or key.shape[3] != cache.shape[3] or past + t > s.kv.capacity:
            raise KVCacheError(f"layer {layer}: keys {tuple(key.shape)} do not fit the cache {tuple(cache.shape)} "
                               f"at position {past}+{t}")
        cache[0, :, past:past + t] = key[0, :, s.start:s.start + t]
        cache[1, :, past:past + t] = value[0, :, s.start:s.start + t]
        k, v = cache[0, :, :past + t], cache[1, :, :past + t]
        if heads != kv_heads:
            k = k.repeat_interleave(heads // kv_heads, dim=0)
            v = v.repeat_interleave(heads // kv_heads, dim=0)
        q = query[0, :, s.start:s.start + t].contiguous()  # [H, t, D]
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=scaling,
                                           attn_mask=_causal_mask(past, t, window, q.device))
        out.append(o[0].transpose(0, 1))  # [t, H, D]
    return torch.cat(out, dim=0)[None], None


def register_attention() -> None:
    """Make `ATTENTION_NAME` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, varlen_attention)


def use_batched_attention(model) -> None:
    """Switch a loaded model's attention to `varlen_attention` (every config object it holds)."""
    register_attention()
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = ATTENTION_NAME
