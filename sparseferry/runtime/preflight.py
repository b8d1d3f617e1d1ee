"""The plan `load` would make, without loading anything: for checks before long work (e.g. `bench`).

`plan_for(checkpoint, memory_budget, storage=..., device=...)` opens the manifest, builds the model
skeleton on the meta device (no weights) and makes the same plan as `load` with the same defaults,
so a budget below the minimum fails here, in a second, with the same BudgetError.
"""
from __future__ import annotations

import torch

from ..hf import build_meta_model, config_from_dict, model_info
from ..store import open_checkpoint
from .budget import parse_budget
from .plan import Plan, make_plan


def plan_for(checkpoint, memory_budget, *, storage: str = "disk", device: str = "cpu") -> Plan:
    """The tier plan `sparseferry.load(checkpoint, device, memory_budget, storage)` would use (BudgetError if none fits)."""
    from .engine import _compressed_head_name, _fused_kernel_available, _on_demand_embedding

    ckpt = open_checkpoint(checkpoint)
    model = build_meta_model(config_from_dict(ckpt.config))
    info = model_info(model)
    budget = parse_budget(memory_budget, ckpt.stored_bytes())
    lazy_emb = _on_demand_embedding(model, info, ckpt) if budget is not None else None
    slots = torch.device(device).type == "cuda"
    dense = slots or not _fused_kernel_available()
    head = _compressed_head_name(model, ckpt, info, torch.device(device), "dense" if dense else "compressed")
    return make_plan(ckpt, budget, storage=storage, slots=slots, exclude=frozenset([lazy_emb] if lazy_emb else []),
                     prefer_dense=dense, compressed=frozenset([head] if head else []))


__all__ = ["plan_for"]
