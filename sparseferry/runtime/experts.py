"""Mixture-of-experts layers that read and compute only the experts their router chose.

transformers fuses a layer's experts into 3-D parameters of one module per layer, decorated with
`@use_experts_implementation` (MixtralExperts, Qwen3MoeExperts, DeepseekV3Experts, GptOssExperts,
...): forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]). The decorator also
states the module's layout (`has_gate`, `has_bias`, `is_transposed`, `has_post_expert_norm`) and
gives it `_apply_gate` / `act_fn`; that is all we rely on, so no family needs its own code.

The experts module's forward is replaced by `experts_forward`, which, once the router has chosen:

    1. hands the union of chosen experts to the ExpertCache (those not in memory are read now),
    2. guesses the next MoE layer's choice and asks the cache to read it ahead (`Predictor`),
    3. computes each chosen expert as it becomes ready, on the tokens routed to it only, straight
       from its stored form: the fused bitmap matmul for a few rows, otherwise one matrix
       decompressed into the scratch buffer and multiplied by torch.

The prediction applies the next layer's router to this layer's expert input (the residual stream
changes little from one layer to the next), or, for a layer whose router cannot be run ahead,
repeats that layer's previous choice. The routers' weights are tiny and kept resident for this.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from ..format import BitmapTensor
from ..store import Checkpoint, CheckpointError
from .expert_cache import ExpertCache


def is_experts_module(mod: nn.Module) -> bool:
    """A transformers fused-experts module (class decorated with `use_experts_implementation`) whose
    forward is the decorated one: a subclass that overrides it computes more around the experts
    (Ergo's repeats each route and normalizes it per expert), so its layer streams whole."""
    if not (all(hasattr(mod, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts"))
            and hasattr(type(mod), "_apply_gate")):
        return False
    mro = type(mod).__mro__
    decorated = next((i for i, k in enumerate(mro) if "_apply_gate" in k.__dict__), len(mro))
    return not any("forward" in k.__dict__ for k in mro[:decorated])


def find_experts(ckpt: Checkpoint, layer: nn.Module, i: int) -> dict[str, dict[str, str]] | None:
    """{experts module path inside the layer: {parameter leaf: checkpoint name}} for layer i; None if
    an expert parameter belongs to a module that is not a fused-experts module (Llama-4's computes
    every expert on pre-sorted tokens): such a layer streams whole (runtime/whole_experts.py)."""
    plen = len(f"{ckpt.layers_prefix}.{i}.")
    groups: dict[str, dict[str, str]] = {}
    for name in ckpt.expert_params(i):
        path, _, leaf = name[plen:].rpartition(".")
        groups.setdefault(path, {})[leaf] = name
    for path, params in groups.items():
        try:
            mod = layer.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"{ckpt.path}: {next(iter(params.values()))} is stored per expert, but the model "
                                  f"built from the config has no module {path!r} in layer {i}") from None
        if not is_experts_module(mod):  # its forward needs every expert: the layer streams whole
            return None
        if getattr(mod, "num_experts", None) != ckpt.num_experts(i):
            raise CheckpointError(f"{ckpt.path}: layer {i} stores {ckpt.num_experts(i)} experts, "
                                  f"{type(mod).__name__} expects {mod.num_experts}")
        up = "gate_up_proj" if mod.has_gate else "up_proj"
        for leaf in (up, "down_proj") + ((f"{up}_bias", "down_proj_bias") if mod.has_bias else ()):
            if leaf not in params and getattr(mod, leaf, None) is not None:
                raise CheckpointError(f"{ckpt.path}: {ckpt.layers_prefix}.{i}.{path}.{leaf} is not stored per expert "
                                      f"(the runtime reads experts one by one)")
    return groups


def find_router(block: nn.Module, experts: nn.Module, num_experts: int, hidden: int) -> tuple[str, nn.Module] | None:
    """The child of the MoE block that scores the experts: it holds a [num_experts, hidden] weight."""
    best = None
    for name, child in block.named_children():
        if child is experts:
            continue
        params = list(child.parameters())
        if any(tuple(p.shape) == (num_experts, hidden) for p in params):
            size = sum(p.numel() for p in params)
            if best is None or size < best[2]:
                best = (name, child, size)
    return (best[0], best[1]) if best else None


def _linear(x: torch.Tensor, w, bias, transposed: bool, scratch: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T (or x @ W when transposed) + bias, W dense or stored (BitmapTensor)."""
    from ..kernels import MATVEC_MAX_BATCH, decompress, kernel_path, linear_wide, sparse_matmul

    if isinstance(w, BitmapTensor):
        fused = x.shape[0] <= MATVEC_MAX_BATCH and kernel_path(x.device) != "torch"
        if not transposed and (fused or scratch is None):  # the fused kernel, or decompress + linear (CUDA)
            return sparse_matmul(x, w, bias)
        rows, cols = w.shape
        nbytes = rows * cols * w.dtype.itemsize  # otherwise: one matrix decompressed into the scratch buffer
        out = scratch[:nbytes].view(w.dtype).view(rows, cols) if scratch is not None and scratch.numel() >= nbytes else None
        w = decompress(w, out=out)
    dt = torch.promote_types(x.dtype, w.dtype)
    if not transposed:  # in fp32 where half-precision GEMM is slow
        return linear_wide(x.to(dt), w.to(dt), None if bias is None else bias.to(dt)).to(x.dtype)
    y = x.to(dt) @ w.to(dt)
    if bias is not None:
        y = y + bias.to(dt)
    return y.to(x.dtype)


def _expert(mod: nn.Module, views: dict, params: dict[str, str], x: torch.Tensor, scratch) -> torch.Tensor:
    """One expert's output on its tokens x [n, H], computed from its stored slices `views`."""
    up = "gate_up_proj" if mod.has_gate else "up_proj"
    get = lambda leaf: views[params[leaf]] if leaf in params else None  # noqa: E731
    h = _linear(x, get(up), get(f"{up}_bias"), mod.is_transposed, scratch)
    h = mod._apply_gate(h) if mod.has_gate else mod.act_fn(h)
    h = _linear(h, get("down_proj"), get("down_proj_bias"), mod.is_transposed, scratch)
    if getattr(mod, "has_post_expert_norm", False):
        h = mod.post_expert_norm(h)
    return h


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """forward of a fused-experts module whose experts live in the ExpertCache (see module docstring)."""
    rt: ExpertsRuntime = self._sf_runtime
    i = self._sf_layer
    with torch.no_grad():
        idx = top_k_index.reshape(hidden_states.shape[0], -1)
        weights = top_k_weights.reshape(idx.shape)
        chosen = [e for e in torch.unique(idx).tolist() if 0 <= e < self.num_experts]
        rt.cache.begin(i, chosen)
        rt.predictor.after(i, hidden_states, idx.shape[-1])
        out = torch.zeros_like(hidden_states)
        remaining = set(chosen)
        try:
            while remaining:
                e, views = rt.cache.take(i, remaining)
                try:
                    tok, pos = torch.where(idx == e)
                    h = _expert(self, views, self._sf_params, hidden_states[tok], rt.scratch)
                    out.index_add_(0, tok, (h * weights[tok, pos, None]).to(out.dtype))
                finally:
                    rt.cache.done(i, e)
                remaining.discard(e)
        finally:
            for e in remaining:  # a failure: nothing of this layer is awaited any more
                rt.cache.done(i, e)
            rt.cache.end_layer(i)
        rt.predictor.chose(i, chosen)
    return out


class Predictor:
    """Guesses which experts the next MoE layer will choose, and asks the cache to read them ahead."""

    def __init__(self, cache: ExpertCache, moe_layers: list[int], routers: dict[int, nn.Module]):
        self.cache = cache
        self.moe_layers = moe_layers
        self.next = {a: b for a, b in zip(moe_layers, moe_layers[1:])}
        self.routers = routers
        self.last: dict[int, list[int]] = {}

    def chose(self, i: int, experts: list[int]) -> None:
        self.last[i] = experts

    def after(self, i: int, x: torch.Tensor, k: int) -> None:
        j = self.next.get(i)
        if j is None:  # the last MoE layer: the first one comes next, at the next token
            first = self.moe_layers[0]
            self.cache.prefetch(first, self.last.get(first, ()))
            return
        guess = self._route(j, x, k)
        self.cache.prefetch(j, guess if guess is not None else self.last.get(j, ()))

    def _route(self, j: int, x: torch.Tensor, k: int) -> list[int] | None:
        router = self.routers.get(j)
        if router is None:
            return None
        try:
            out = router(x)
        except Exception:  # noqa: BLE001 - only a guess: this router cannot run ahead, repeat choices instead
            self.routers.pop(j, None)
            return None
        outs = out if isinstance(out, (tuple, list)) else (out,)
        idx = next((t for t in outs if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 2), None)
        if idx is None:
            n = self.cache.ckpt.num_experts(j)
            scores = next((t for t in outs if isinstance(t, torch.Tensor) and t.is_floating_point()
                           and t.dim() == 2 and t.shape[-1] == n), None)
            if scores is None or n < k:
                self.routers.pop(j, None)
                return None
            idx = scores.topk(k, dim=-1).indices
        return torch.unique(idx).tolist()


class ExpertsRuntime:
    """The experts modules of a loaded model, their cache and predictor.

    Built before planning (the planner needs the routers' size), installed once the cache exists.
    """

    def __init__(self, ckpt: Checkpoint, layers: nn.ModuleList, moe_layers: list[int]):
        self.ckpt = ckpt
        self.cache: ExpertCache | None = None
        self.scratch: torch.Tensor | None = None
        self.modules: list[tuple[int, nn.Module, dict[str, str]]] = []
        self.router_params: dict[int, list[str]] = {}  # checkpoint names kept resident for prediction
        self.routers: dict[int, nn.Module] = {}
        found_per_layer = {i: find_experts(ckpt, layers[i], i) for i in moe_layers}
        self.moe_layers = [i for i in moe_layers if found_per_layer[i] is not None]  # read expert by expert
        for i in self.moe_layers:
            for path, params in found_per_layer[i].items():
                mod = layers[i].get_submodule(path)
                self.modules.append((i, mod, params))
                block_path = path.rpartition(".")[0]
                block = layers[i].get_submodule(block_path) if block_path else layers[i]
                w = mod.gate_up_proj if mod.has_gate else mod.up_proj
                hidden = w.shape[1] if mod.is_transposed else w.shape[2]
                found = find_router(block, mod, mod.num_experts, hidden)
                if found is not None and i not in self.routers:
                    name, router = found
                    prefix = f"{ckpt.layers_prefix}.{i}.{block_path + '.' if block_path else ''}{name}."
                    names = [prefix + n for n, _ in router.named_parameters()]
                    if all(n in ckpt.tensors for n in names):
                        self.router_params[i] = names
                        self.routers[i] = router

    @property
    def per_expert(self) -> frozenset[int]:
        return frozenset(self.moe_layers)

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset(n for names in self.router_params.values() for n in names)

    def install(self, cache: ExpertCache) -> None:
        """Route every experts module's forward through the cache."""
        self.cache = cache
        self.predictor = Predictor(cache, self.moe_layers, dict(self.routers))
        for i, mod, params in self.modules:
            mod._sf_runtime, mod._sf_layer, mod._sf_params = self, i, params
            mod.forward = types.MethodType(experts_forward, mod)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
