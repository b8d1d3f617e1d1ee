"""compressed-tensors "sparse-24-bitmask" tensors -> dense weights (docs/FORMAT.md, section 5).

The 2:4 layout of compressed-tensors (Sparse24BitMaskCompressor) stores a weight `P.weight[rows, cols]`
as three tensors:

    P.shape       int64 [2, 1] (or [2])     [rows, cols]
    P.compressed  dtype of W, [rows, cols/2] the two kept values of every group of 4, row-major
    P.bitmask     uint8 [rows, ceil(cols/8)] the kept positions, bits little end first (as sparse-bitmask)

The kept positions are the two largest magnitudes of each group of four, so a kept value may be
zero; there are no row offsets (every row keeps exactly cols/2 values). `convert` scatters the values
back into a dense matrix and stores it in sparseferry's own bitmap encoding, which drops the zeros.
"""
from __future__ import annotations

import torch

from .errors import SparseferryError

SPARSE24_FORMATS = ("sparse-24-bitmask", "sparse_24_bitmask")
SPARSE24_PARTS = ("shape", "compressed", "bitmask")


class Sparse24Error(SparseferryError):
    """A sparse-24-bitmask tensor whose parts do not fit together."""


def is_sparse24(sparsity_config: dict | None) -> bool:
    return isinstance(sparsity_config, dict) and sparsity_config.get("format") in SPARSE24_FORMATS


def sparse24_to_dense(parts: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The dense weight of one sparse-24-bitmask tensor; Sparse24Error names the tensor and the part at fault."""
    missing = [p for p in SPARSE24_PARTS if p not in parts]
    if missing:
        raise Sparse24Error(f"sparse-24-bitmask tensor {name} lacks part {missing[0]!r}")
    shape, values, bitmask = parts["shape"], parts["compressed"], parts["bitmask"]
    if shape.numel() != 2 or shape.dtype.is_floating_point:
        raise Sparse24Error(f"{name}.shape: expected 2 integers [rows, cols], got {list(shape.shape)} {shape.dtype}")
    rows, cols = (int(v) for v in shape.flatten().tolist())
    if rows < 0 or cols <= 0 or cols % 4:
        raise Sparse24Error(f"{name}.shape: [{rows}, {cols}]; 2:4 sparsity needs a column count divisible by 4")
    if tuple(values.shape) != (rows, cols // 2):
        raise Sparse24Error(f"{name}.compressed: shape {list(values.shape)}, expected [{rows}, {cols // 2}]")
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, (cols + 7) // 8):
        raise Sparse24Error(f"{name}.bitmask: {bitmask.dtype} {list(bitmask.shape)}, expected uint8 [{rows}, {(cols + 7) // 8}]")
    bits = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    mask = ((bitmask.unsqueeze(-1) & bits) != 0).reshape(rows, -1)[:, :cols]
    kept = mask.view(rows, cols // 4, 4).sum(-1)
    if not bool((kept == 2).all()):
        bad = int((kept != 2).any(-1).nonzero()[0])
        raise Sparse24Error(f"{name}.bitmask: row {bad} does not keep exactly 2 of every 4 positions")
    dense = torch.zeros(rows, cols, dtype=values.dtype)
    dense[mask] = values.reshape(-1)
    return dense


__all__ = ["SPARSE24_FORMATS", "SPARSE24_PARTS", "Sparse24Error", "is_sparse24", "sparse24_to_dense"]
