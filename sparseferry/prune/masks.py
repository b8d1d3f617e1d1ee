"""Choosing which weights to drop, given a score per weight: the part every pruning method shares.

Conventions, used by every function here:
  * a weight matrix is seen as W[rows, cols] = [out_features, in_features] (GPT-2's Conv1D stores the
    transpose; callers transpose before scoring);
  * a *mask* is a bool tensor of W's shape, True where the weight is pruned (set to zero);
  * a lower score means less important; ties are broken by position (the earlier element is pruned
    first), so every selection is deterministic;
  * an N:M pattern keeps at most N non-zeros in every group of M consecutive columns of a row
    (2:4 is the pattern of NVIDIA's sparse tensor cores); it prunes the M-N lowest scores per group.
"""
from __future__ import annotations

import re

import torch

from ..errors import SparseferryError


class PruneError(SparseferryError):
    """Pruning cannot run with these arguments, on this model or with this calibration data."""


Pattern = tuple[int, int]  # (N, M): keep N of every M consecutive weights in a row


def parse_pattern(pattern) -> Pattern | None:
    """`None`, "2:4" or (2, 4) -> (N, M) with 0 < N < M; anything else raises PruneError."""
    if pattern is None:
        return None
    if isinstance(pattern, str):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
        if not m:
            raise PruneError(f"pattern {pattern!r} does not parse (expected N:M, e.g. 2:4)")
        n, mm = int(m.group(1)), int(m.group(2))
    else:
        try:
            n, mm = (int(v) for v in pattern)
        except (TypeError, ValueError):
            raise PruneError(f"pattern {pattern!r} is not N:M (expected e.g. '2:4' or (2, 4))") from None
    if not 0 < n < mm:
        raise PruneError(f"pattern {n}:{mm}: N:M needs 0 < N < M (N weights kept of every M)")
    return n, mm


def check_sparsity(sparsity) -> float:
    """The sparsity as a float in [0, 1); anything else raises PruneError."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise PruneError(f"sparsity {sparsity!r} is not a number") from None
    if not 0.0 <= s < 1.0:
        raise PruneError(f"sparsity {sparsity!r} is outside [0, 1) (the fraction of weights set to zero)")
    return s


def _lowest(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Bool mask of the k lowest entries along `dim` (ties: lower index first)."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return mask
    idx = torch.argsort(scores, dim=dim, stable=True).narrow(dim, 0, k)
    return mask.scatter_(dim, idx, True)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Prune the floor(sparsity * n) lowest scores of the whole matrix, or of each row with per_row."""
    if per_row:
        return _lowest(scores, int(scores.shape[1] * sparsity), dim=1)
    flat = _lowest(scores.reshape(-1), int(scores.numel() * sparsity), dim=0)
    return flat.view(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the M-N lowest scores of every group of M consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise PruneError(f"{cols} columns are not divisible by M={m} of the {n}:{m} pattern")
    groups = scores.reshape(rows, cols // m, m)  # [rows, groups, M]
    return _lowest(groups, m - n, dim=2).view(rows, cols)


def select_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern | None, per_row: bool) -> torch.Tensor:
    """The mask for `scores` [rows, cols]: N:M when a pattern is given, else unstructured."""
    if pattern is not None:
        return nm_mask(scores, *pattern)
    return unstructured_mask(scores, sparsity, per_row)


def pruned_count(shape: tuple[int, int], sparsity: float, pattern: Pattern | None, per_row: bool,
                 block: int | None = None) -> int:
    """How many weights a selection prunes (exactly) on a [rows, cols] matrix.

    `block`: the mask is chosen separately for each block of `block` columns (SparseGPT), so the
    floor is taken per block.
    """
    rows, cols = shape
    if pattern is not None:
        n, m = pattern
        return rows * (cols // m) * (m - n)
    widths = [min(block, cols - c) for c in range(0, cols, block)] if block else [cols]
    if per_row:
        return rows * sum(int(w * sparsity) for w in widths)
    return sum(int(rows * w * sparsity) for w in widths)


def nm_valid(w: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of M consecutive columns of every row of `w` has at most N non-zeros."""
    rows, cols = w.shape
    if cols % m:
        return False
    return bool(((w != 0).reshape(rows, cols // m, m).sum(dim=2) <= n).all())


def sparsity_of(w: torch.Tensor) -> float:
    """Fraction of entries equal to zero."""
    return 1.0 - int(torch.count_nonzero(w)) / w.numel() if w.numel() else 0.0
