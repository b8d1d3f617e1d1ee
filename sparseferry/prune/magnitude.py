"""Magnitude pruning: drop the weights of smallest |W|. Needs no calibration data.

The baseline every pruning paper compares against; at 50% unstructured it already costs LLMs a
lot of perplexity, which is what Wanda and SparseGPT recover.
"""
from __future__ import annotations

import torch

from .masks import Pattern, pruned_count, select_mask


def magnitude_mask(w: torch.Tensor, sparsity: float, pattern: Pattern | None = None, per_row: bool = False) -> torch.Tensor:
    """Mask (True = prune) of the smallest |w| [rows, cols]: over the whole matrix, per row, or per N:M group."""
    return select_mask(w.abs(), sparsity, pattern, per_row)


class Magnitude:
    """Pruner of one linear layer by |W| (see `Wanda` for the shared pruner interface)."""

    needs_calibration = False

    def __init__(self, cols: int):
        self.cols = cols

    def add_batch(self, x: torch.Tensor) -> None:
        """Calibration inputs are not used by magnitude pruning."""

    def prune(self, w: torch.Tensor, sparsity: float, pattern: Pattern | None, per_row: bool) -> torch.Tensor:
        """The pruned copy of w [rows, cols] (fp32)."""
        w = w.float()
        return w.masked_fill(magnitude_mask(w, sparsity, pattern, per_row), 0.0)

    def expected_pruned(self, shape, sparsity: float, pattern: Pattern | None, per_row: bool) -> int:
        return pruned_count(shape, sparsity, pattern, per_row)
