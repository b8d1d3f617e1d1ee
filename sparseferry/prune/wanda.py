"""Wanda: pruning by weights and activations (Sun, Liu, Bair, Kolter 2023, arXiv 2306.11695).

The score of weight W[i, j] is |W[i, j]| * ||X_j||_2, where X_j is the j-th input feature over all
calibration tokens; the lowest scores are pruned within each output row (the paper's comparison
group), or within each N:M group. No weight update: one pass of statistics, then a sort.
"""
from __future__ import annotations

import torch

from .masks import Pattern, pruned_count, select_mask


def wanda_scores(w: torch.Tensor, col_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||_2 for w [rows, cols] and col_sq_norms [cols] (= sum over tokens of X_j^2)."""
    return w.abs().float() * col_sq_norms.sqrt().to(torch.float32)[None, :]


def wanda_mask(w: torch.Tensor, col_sq_norms: torch.Tensor, sparsity: float, pattern: Pattern | None = None) -> torch.Tensor:
    """Mask (True = prune) of the lowest Wanda scores per output row, or per N:M group."""
    return select_mask(wanda_scores(w, col_sq_norms), sparsity, pattern, per_row=True)


class Wanda:
    """Pruner of one linear layer: accumulates ||X_j||^2 from its inputs, then prunes by |W|*||X_j||.

    The pruner interface (shared by Magnitude and SparseGPT):
      add_batch(x)   x [..., cols]: inputs of the layer for some calibration tokens
      prune(w, sparsity, pattern, per_row) -> pruned copy of w [rows, cols], fp32
      expected_pruned(shape, ...) -> the exact number of weights `prune` sets to zero (at least)
    """

    needs_calibration = True

    def __init__(self, cols: int):
        self.cols = cols
        self.sq_norms = torch.zeros(cols, dtype=torch.float64)  # sum over tokens of x_j^2
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.cols)
        self.sq_norms += torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).double().square()
        self.tokens += x.shape[0]

    def prune(self, w: torch.Tensor, sparsity: float, pattern: Pattern | None, per_row: bool) -> torch.Tensor:
        """`per_row` is ignored: Wanda always compares weights within an output row."""
        w = w.float()
        return w.masked_fill(wanda_mask(w, self.sq_norms, sparsity, pattern), 0.0)

    def expected_pruned(self, shape, sparsity: float, pattern: Pattern | None, per_row: bool) -> int:
        return pruned_count(shape, sparsity, pattern, per_row=True)
