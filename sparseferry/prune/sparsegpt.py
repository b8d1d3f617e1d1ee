"""SparseGPT: one-shot pruning with weight reconstruction (Frantar, Alistarh 2023, arXiv 2301.00774).

For a linear layer y = W x, pruning row r of W by mask M while updating its kept weights to keep
W x close on the calibration inputs is a least-squares problem with Hessian H = 2 X X^T / n
(X [cols, n]: the layer's inputs, one column per calibration token), the same for every row. The
paper solves it approximately and fast:

  * columns are processed left to right; when column j is pruned (w -> q, q = 0 where masked) its
    error err = (w - q) / U[j, j] is pushed onto the not-yet-processed columns by the optimal
    brain surgeon update  W[:, j+1:] -= err ⊗ U[j, j+1:],  where U is the upper Cholesky factor of
    H^-1 (its rows hold the needed rows of the inverse Hessians of the shrinking column sets);
  * updates are applied lazily: inside a block of B = 128 columns eagerly, to the columns after the
    block once per block, with one matrix product (B rank-one updates batched);
  * the mask is chosen adaptively per block, just before the block is processed, from the already
    updated weights: the lowest w^2 / U[j, j]^2 within the block (or within each N:M group, chosen
    when the group's first column is reached);
  * H is regularised: inputs that are always zero ("dead" columns) get H[j, j] = 1 and their weights
    are zeroed; 1% of the mean diagonal is added to the diagonal (dampening).

Statistics are accumulated and the reconstruction is done in fp32, whatever the model's dtype.
"""
from __future__ import annotations

import math

import torch

from .masks import Pattern, PruneError, nm_mask, pruned_count, unstructured_mask

BLOCK = 128  # columns per lazy-update block (the paper's B)
PERCDAMP = 0.01  # dampening: this fraction of mean(diag(H)) is added to the diagonal


def block_size(pattern: Pattern | None, block: int = BLOCK) -> int:
    """The block width: `block`, rounded down to a multiple of M so no N:M group straddles two blocks."""
    if pattern is None:
        return block
    m = pattern[1]
    return max(m, block - block % m)


def inverse_hessian_factor(h: torch.Tensor, percdamp: float = PERCDAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U [cols, cols] upper triangular with U^T U = (H + damp I)^-1 after dead columns are fixed.

    `h` is consumed (modified in place). If H + damp I is not positive definite in floating point
    (nearly collinear inputs, too few samples), the dampening is raised tenfold, up to three times.
    """
    diag = torch.diagonal(h)
    dead = diag == 0  # inputs that were zero for every calibration token
    diag[dead] = 1.0
    damp = percdamp * float(diag.mean())
    for _ in range(4):
        diag += damp
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)  # (H + damp I)^-1, [cols, cols]
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u, dead
        diag -= damp
        damp *= 10
    raise PruneError("SparseGPT: the calibration Hessian stays singular even with 1000x the dampening; "
                     "use more or longer calibration samples (--nsamples, --seqlen)")


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float, pattern: Pattern | None = None,
                    per_row: bool = False, block: int = BLOCK, percdamp: float = PERCDAMP) -> torch.Tensor:
    """The pruned and reconstructed copy of w [rows, cols] given the Hessian h [cols, cols] (consumed).

    Unstructured: in every block of `block` columns, the floor(sparsity * rows * width) lowest
    w^2/U[j,j]^2 are pruned (per row with `per_row`). N:M: the M-N lowest of every group. Returns fp32.
    """
    w = w.float().clone()
    rows, cols = w.shape
    u, dead = inverse_hessian_factor(h, percdamp)
    w[:, dead] = 0.0
    bs = block_size(pattern, block)
    for b0 in range(0, cols, bs):
        b1 = min(b0 + bs, cols)
        w1 = w[:, b0:b1].clone()  # [rows, width], updated in place column by column
        u1 = u[b0:b1, b0:b1]
        d = torch.diagonal(u1)  # [width]
        err = torch.zeros_like(w1)  # [rows, width]: (w - q) / U[j, j] of each column
        if pattern is None:
            prune1 = unstructured_mask(w1.square() / d.square()[None, :], sparsity, per_row)
        else:
            n, m = pattern
            prune1 = torch.zeros_like(w1, dtype=torch.bool)
        for j in range(b1 - b0):
            if pattern is not None and j % m == 0:
                g = slice(j, j + m)
                prune1[:, g] = nm_mask(w1[:, g].square() / d[g].square()[None, :], n, m)
            col = w1[:, j]
            q = col.masked_fill(prune1[:, j], 0.0)
            e = (col - q) / d[j]  # [rows]
            w1[:, j] = q
            w1[:, j + 1 :] -= e[:, None] * u1[j, j + 1 :][None, :]
            err[:, j] = e
        w[:, b0:b1] = w1
        w[:, b1:] -= err @ u[b0:b1, b1:]  # the lazy update of all later columns
    return w


class SparseGPT:
    """Pruner of one linear layer: accumulates H = 2 X X^T / n from its inputs (fp32), then prunes
    with reconstruction. Interface as `Wanda`. Holds a [cols, cols] fp32 matrix until pruned."""

    needs_calibration = True

    def __init__(self, cols: int, block: int = BLOCK, percdamp: float = PERCDAMP):
        self.cols = cols
        self.block = block
        self.percdamp = percdamp
        self.h = torch.zeros(cols, cols, dtype=torch.float32)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.cols).float()  # [t, cols]
        t = x.shape[0]
        # Running mean: H_new = (n H_old + 2 x^T x) / (n + t).
        self.h *= self.tokens / (self.tokens + t)
        self.tokens += t
        x = x * math.sqrt(2.0 / self.tokens)
        self.h.addmm_(x.T, x)

    def prune(self, w: torch.Tensor, sparsity: float, pattern: Pattern | None, per_row: bool) -> torch.Tensor:
        if self.h is None:
            raise PruneError("SparseGPT pruner used twice: its Hessian is consumed by the first prune")
        h, self.h = self.h, None
        return sparsegpt_prune(w, h, sparsity, pattern, per_row, self.block, self.percdamp)

    def expected_pruned(self, shape, sparsity: float, pattern: Pattern | None, per_row: bool) -> int:
        return pruned_count(shape, sparsity, pattern, per_row, block=block_size(pattern, self.block))
