"""RMSNorm of a decode step on the CPU in one native call.

transformers' LlamaRMSNorm, and its copies in other models, normalizes a row of a few thousand
numbers in about seven tensor operations; at a decode step (one row a sequence, two norms a layer)
their dispatch is what costs, tens of microseconds each on a slow CPU. `patch(model)` gives every
module whose class is named ...RMSNorm, holds a 1-D `weight` and a float `variance_epsilon` (or
`eps`), a forward that runs `kernels.native.rms_norm_bf16` (csrc/norm.c, one thread) for bf16
inputs and weights of up to NATIVE_MAX_ELEMENTS numbers, and the module's own forward for anything
else (other dtypes, extra arguments, long prefills).

Classes of that name compute different things (Gemma's scales by 1 + weight, some norms cast in a
different order), so the first call of each module also runs its own forward on the same input and
keeps the native one only if the two agree: bit for bit but for at most one bf16 step in a few
elements (the fp32 sum of squares runs in another order than torch's). A module that disagrees goes
back to its own forward for good.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from ..kernels import native

AGREE_EXACT = 0.99  # share of elements that must be equal at the first call (the others within one bf16 step)
NATIVE_MAX_ELEMENTS = 1 << 18  # larger inputs (long prefills) keep torch's forward: its operations use every thread


def _eps_name(mod: nn.Module) -> str | None:
    for name in ("variance_epsilon", "eps"):
        if isinstance(getattr(mod, name, None), float):
            return name
    return None


def patchable(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return (type(mod).__name__.endswith("RMSNorm") and isinstance(w, torch.Tensor) and w.dim() == 1
            and _eps_name(mod) is not None and "forward" not in mod.__dict__)


def patch(model: nn.Module) -> int:
    """Give the RMSNorm modules of model the native forward (see above); returns how many."""
    if native._native is None:
        return 0
    n = 0
    for mod in model.modules():
        if patchable(mod):
            mod._sf_norm_forward = mod.forward
            mod._sf_norm_eps = _eps_name(mod)
            mod._sf_norm_checked = False
            mod.forward = types.MethodType(_forward, mod)
            n += 1
    return n


def agree(got: torch.Tensor, want: torch.Tensor) -> bool:
    """got equals want but for at most one bf16 step in a few elements."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    g, w = got.float(), want.float()
    same = (g == w) | (g.isnan() & w.isnan())
    step = w.abs() * 2.0**-7 + torch.finfo(torch.bfloat16).tiny
    return bool(((g - w).abs() <= step)[~same].all()) and same.float().mean().item() >= AGREE_EXACT


def _forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    w = self.weight
    if (args or kwargs or not isinstance(hidden_states, torch.Tensor) or hidden_states.dtype != torch.bfloat16
            or w.dtype != torch.bfloat16 or hidden_states.device.type != "cpu" or w.device.type != "cpu"
            or hidden_states.shape[-1:] != w.shape or not w.is_contiguous()  # placeholders are not contiguous
            or hidden_states.numel() > NATIVE_MAX_ELEMENTS):
        return self._sf_norm_forward(hidden_states, *args, **kwargs)
    y = native.rms_norm_bf16(hidden_states, w, getattr(self, self._sf_norm_eps))
    if not self._sf_norm_checked:
        want = self._sf_norm_forward(hidden_states)
        if not agree(y, want):
            del self.forward  # this class computes something else: its own forward from now on
            return want
        self._sf_norm_checked = True
    return y
