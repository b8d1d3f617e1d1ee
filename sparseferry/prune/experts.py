"""Pruning the experts of a mixture of experts: each expert's matrices on the tokens routed to it.

transformers keeps the experts of a decoder layer fused in one module (its `@use_experts_implementation`
classes): 3-D parameters [E, rows, cols] (`gate_up_proj` or `up_proj`, then `down_proj`; stored
[E, in, out] when the module says `is_transposed`; per-expert biases [E, out] with `has_bias`), called
as forward(hidden_states [T, hidden], top_k_index [T, k], top_k_weights [T, k]). Every expert matrix
is pruned on its own, as one linear layer:

  * magnitude: per expert, no data;
  * Wanda and SparseGPT: from the calibration tokens the router sends to that expert. The experts
    module's inputs are recorded during the layer's dense forward pass; expert e's first projection
    sees X_e = the hidden states of the tokens with e among their top-k, its down projection the
    intermediate act(X_e W^T + b) (the module's own gate/activation, as transformers' generic experts
    forward computes it), both with the dense weights, as for the layer's other linears. The routing
    weight is *not* applied: it scales the expert's output, not its input, and both methods' formulas
    are over the linear's input (Wanda: |W_ij| * ||X_j||_2; SparseGPT: H = 2 X X^T / n);
  * an expert no calibration token was routed to has no statistics: it is magnitude-pruned (same
    sparsity or N:M pattern), and the report says so.

Experts modules outside transformers' experts interface (no routing arguments to read) are
magnitude-pruned per expert, rows taken as their stored dim 1. Routing gates (a direct nn.Linear of
the block holding the experts with 1 or E outputs, e.g. Qwen2-MoE's shared_expert_gate) stay dense.
Memory: the layer's experts inputs ([calibration tokens, hidden], as one activation buffer) and the
statistics of one expert at a time.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from .magnitude import Magnitude
from .masks import PruneError


@dataclass
class ExpertsModule:
    """A fused-experts module of a decoder layer and how to prune it."""

    name: str  # qualified name inside the layer, e.g. "mlp.experts"
    module: nn.Module
    num_experts: int
    matrices: list[str]  # its per-expert matrices (3-D parameters), in forward order when `routed`
    routed: bool  # follows transformers' experts interface: per-expert statistics can be collected
    transposed: bool = False  # expert slices stored [in, out]

    def view(self, pname: str, e: int) -> torch.Tensor:
        """Expert e's slice of `pname` as [out, in] (a view of the parameter): the e-th of E equal
        contiguous pieces along dim 0, as the checkpoint stores it (docs/FORMAT.md, 2b)."""
        p = getattr(self.module, pname)
        w = p[e] if p.dim() == 3 else p.view(self.num_experts, -1, p.shape[-1])[e]
        return w.T if self.transposed else w


def experts_modules(layer: nn.Module) -> dict[str, ExpertsModule]:
    """{name: ExpertsModule} of the fused-experts modules inside a decoder layer.

    The modules and expert matrices are those `hf.expert_parameters` finds (an integer `num_experts`
    or `moe_num_experts`; [E, R, C] parameters, or DBRX's [E * F, H]), per-expert biases excluded.
    """
    from ..hf import expert_parameters

    found = {k.lstrip("."): e for k, e in expert_parameters(layer, "").items()}  # "" prefix: names inside the layer
    out = {}
    for name, mod in layer.named_modules():
        own = {p for p, _ in mod.named_parameters(recurse=False) if (f"{name}.{p}" if name else p) in found}
        e = next((found[f"{name}.{p}" if name else p] for p in own), None)
        mats = [p for p, t in mod.named_parameters(recurse=False) if p in own and (t.dim() == 3 or t.shape[0] > e)]
        if not mats:
            continue
        first = "gate_up_proj" if getattr(mod, "has_gate", True) else "up_proj"
        routed = hasattr(mod, "is_transposed") and first in mats and "down_proj" in mats and len(mats) == 2
        out[name] = ExpertsModule(name, mod, e, [first, "down_proj"] if routed else mats, routed,
                                  bool(getattr(mod, "is_transposed", False)) if routed else False)
    return out


def routing_gates(layer: nn.Module, experts: dict[str, ExpertsModule]) -> set[str]:
    """Names (inside the layer) of its nn.Linear routing gates, kept dense: those with E outputs (a router,
    e.g. DBRX's `router.layer`) and those with 1 output in the block holding the experts (a shared-expert
    gate, e.g. Qwen2-MoE's `shared_expert_gate`); never a linear inside an experts module."""
    gates = set()
    for name, spec in experts.items():
        parent = name.rpartition(".")[0]
        for full, child in layer.named_modules():
            if not isinstance(child, nn.Linear) or full == name or full.startswith(name + "."):
                continue
            in_block = not parent or full.startswith(parent + ".")
            if child.out_features == spec.num_experts or (child.out_features == 1 and in_block):
                gates.add(full)
    return gates


@dataclass
class RoutedInputs:
    """What an experts module received over the calibration samples: hidden [T, hidden], top_k_index [T, k]."""

    hidden: list = field(default_factory=list)
    index: list = field(default_factory=list)

    def tokens_of(self, num_experts: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(all hidden states [T, hidden], per expert the row indices of the tokens routed to it)."""
        if not self.hidden:
            return torch.empty(0), [torch.empty(0, dtype=torch.long) for _ in range(num_experts)]
        hidden, flat = torch.cat(self.hidden), torch.cat(self.index)  # [T, hidden], [T, k]
        self.hidden, self.index = [], []  # one copy held, not two
        k = flat.shape[1]
        flat = flat.reshape(-1).clamp(0, num_experts)  # ids >= E (expert-parallel sentinels): dropped below
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts + 1).tolist()
        rows = (order // k).split(counts)[:num_experts]  # token rows, grouped by expert
        return hidden, list(rows)


def record_routed_inputs(spec: ExpertsModule, sink: RoutedInputs):
    """A forward pre-hook on `spec.module` appending each call's hidden states and top-k indices to `sink`."""
    params = list(inspect.signature(spec.module.forward).parameters)

    def hook(_mod, args, kwargs):
        bound = dict(zip(params, args))
        bound.update(kwargs)
        try:
            hidden, index = bound[params[0]], bound[params[1]]
        except (KeyError, IndexError):
            raise PruneError(f"{type(spec.module).__name__}: called without (hidden_states, top_k_index); cannot "
                             "collect per-expert calibration statistics") from None
        hidden = hidden.detach().reshape(-1, hidden.shape[-1])
        sink.hidden.append(hidden.clone())
        sink.index.append(index.detach().reshape(hidden.shape[0], -1).long().clone())

    return spec.module.register_forward_pre_hook(hook, with_kwargs=True)


def intermediate(spec: ExpertsModule, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's down-projection input for its tokens x [n, hidden]: act(x W^T + b), as transformers'
    generic experts forward computes it (the module's own `_apply_gate`, or `act_fn` without a gate)."""
    mod, first = spec.module, spec.matrices[0]
    y = x @ spec.view(first, e).T
    if getattr(mod, "has_bias", False):
        y = y + getattr(mod, f"{first}_bias")[e]
    return mod._apply_gate(y) if getattr(mod, "has_gate", True) else mod.act_fn(y)


def prune_experts(spec: ExpertsModule, pruner_cls, sparsity: float, pat, per_row: bool, routed: RoutedInputs | None,
                  prefix: str, check) -> tuple[list[dict], dict]:
    """Prune every expert matrix of `spec` in place (rounded to the module's source dtype by `check`).

    `routed`: the module's recorded inputs (calibrated methods), None for magnitude. `check(name, new,
    expected)` rounds, verifies and reports one pruned [out, in] matrix, returning (rounded, entry).
    Returns (tensor report entries, the module's routing summary).
    """
    E = spec.num_experts
    calibrated = pruner_cls.needs_calibration and spec.routed
    hidden, rows = routed.tokens_of(E) if calibrated and routed is not None else (None, None)
    tokens = [int(r.numel()) for r in rows] if rows is not None else None
    entries = []
    for e in range(E):
        xs = None
        if tokens is not None and tokens[e] > 0:
            x = hidden[rows[e]]
            xs = [x, intermediate(spec, e, x)]  # inputs of the first and the down projection, dense weights
        for j, pname in enumerate(spec.matrices):
            w = spec.view(pname, e)
            if xs is not None:
                pruner = pruner_cls(w.shape[1])
                pruner.add_batch(xs[j])
                how = pruner_cls.__name__.lower()
            else:
                pruner = Magnitude(w.shape[1])
                how = ("magnitude" if not pruner_cls.needs_calibration else
                       "magnitude (no routed tokens)" if spec.routed else "magnitude (no routing statistics)")
            new = pruner.prune(w, sparsity, pat, per_row)
            expected = pruner.expected_pruned(tuple(w.shape), sparsity, pat, per_row)
            del pruner
            new, entry = check(f"{prefix}{spec.name}.{pname}[{e}]", new, expected)
            entries.append({**entry, "expert": e, "method": how, "tokens": tokens[e] if tokens is not None else None})
            w.copy_(new)
        del xs
    summary = {"module": f"{prefix}{spec.name}", "num_experts": E, "routed": spec.routed, "tokens": tokens,
               "no_tokens": [e for e in range(E) if tokens is not None and tokens[e] == 0]}
    if pruner_cls.needs_calibration and not spec.routed:
        summary["note"] = "not a transformers experts module: magnitude-pruned per expert"
    return entries, summary
