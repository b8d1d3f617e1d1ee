"""The bitmap sparse encoding of one matrix (docs/FORMAT.md, section 1), in plain torch.

`encode` and `decode` here are the reference: slow, obviously correct, any device. The fast
kernels in `sparseferry.kernels` are tested against them.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from .errors import SparseferryError

BLOCK_COLS = 1024  # B of P.block_offsets: columns per block (a multiple of 8)
VALUE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The standard compressed-tensors part names, and our extension.
PARTS = ("shape", "compressed", "bitmask", "row_offsets", "block_offsets")
_BIT = None  # lazily built per device: tensor([1, 2, 4, ..., 128], uint8)


class FormatError(SparseferryError):
    """A tensor or file does not follow docs/FORMAT.md."""


@dataclass
class BitmapTensor:
    """A 2-D matrix stored as a bitmap of non-zero positions plus the packed non-zero values.

    values:        [nnz] in the matrix dtype, row-major order of the non-zeros
    bitmask:       [rows, ceil(cols/8)] uint8, bit j%8 of byte j//8 of row r = (W[r, j] != 0)
    row_offsets:   [rows] int64, index in `values` of the first value of each row
    block_offsets: [rows, ceil(cols/B)] int32, first value of each column block, relative to its row
    """

    shape: tuple[int, int]
    values: torch.Tensor
    bitmask: torch.Tensor
    row_offsets: torch.Tensor
    block_offsets: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        """Bytes stored (all five parts)."""
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    @property
    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.values.element_size()

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device, non_blocking: bool = False) -> "BitmapTensor":
        mv = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return BitmapTensor(self.shape, mv(self.values), mv(self.bitmask), mv(self.row_offsets), mv(self.block_offsets))

    def parts(self) -> dict[str, torch.Tensor]:
        """The stored tensors, keyed by part name (suffix after `P.`).

        block_offsets is stored only when a row spans several column blocks: with one block it is
        all zeros, and readers recreate it.
        """
        parts = {
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "compressed": self.values,
            "bitmask": self.bitmask,
            "row_offsets": self.row_offsets,
        }
        if self.block_offsets.shape[1] > 1:
            parts["block_offsets"] = self.block_offsets
        return parts

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], name: str = "tensor") -> "BitmapTensor":
        """Assemble from stored parts, checking their shapes; computes block_offsets if absent."""
        for p in ("shape", "compressed", "bitmask", "row_offsets"):
            if p not in parts:
                raise FormatError(f"{name}: missing part {name}.{p}")
        shp = parts["shape"]
        if shp.dtype != torch.int64 or shp.numel() != 2:
            raise FormatError(f"{name}.shape: expected int64 [2], got {shp.dtype} {list(shp.shape)}")
        rows, cols = (int(v) for v in shp.tolist())
        values, bitmask, row_offsets = parts["compressed"], parts["bitmask"], parts["row_offsets"]
        if values.dtype not in VALUE_DTYPES or values.dim() != 1:
            raise FormatError(f"{name}.compressed: expected 1-D bf16/fp16/fp32, got {values.dtype} {list(values.shape)}")
        if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, (cols + 7) // 8):
            raise FormatError(f"{name}.bitmask: expected uint8 {[rows, (cols + 7) // 8]}, got {bitmask.dtype} {list(bitmask.shape)}")
        if row_offsets.dtype != torch.int64 or tuple(row_offsets.shape) != (rows,):
            raise FormatError(f"{name}.row_offsets: expected int64 [{rows}], got {row_offsets.dtype} {list(row_offsets.shape)}")
        block_offsets = parts.get("block_offsets")
        nblocks = (cols + BLOCK_COLS - 1) // BLOCK_COLS
        if block_offsets is None:
            if nblocks <= 1:  # one column block: every block starts at its row's start
                block_offsets = torch.zeros(rows, nblocks, dtype=torch.int32, device=bitmask.device)
            else:
                block_offsets = _block_offsets(_unpack(bitmask, cols))
        elif block_offsets.dtype != torch.int32 or tuple(block_offsets.shape) != (rows, nblocks):
            raise FormatError(f"{name}.block_offsets: expected int32 {[rows, nblocks]}, got {block_offsets.dtype} {list(block_offsets.shape)}")
        return cls((rows, cols), values, bitmask, row_offsets, block_offsets)


def _bits(device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def _unpack(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """[rows, ceil(cols/8)] uint8 -> [rows, cols] bool (little bit order)."""
    rows = bitmask.shape[0]
    bits = (bitmask.unsqueeze(-1) & _bits(bitmask.device)) != 0  # [rows, nbytes, 8]
    return bits.reshape(rows, -1)[:, :cols]


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """[rows, cols] bool -> [rows, ceil(cols/8)] uint8 (little bit order, rows padded with 0 bits)."""
    rows, cols = mask.shape
    pad = (-cols) % 8
    if pad:
        mask = torch.nn.functional.pad(mask, (0, pad))
    m = mask.reshape(rows, -1, 8).to(torch.uint8) * _bits(mask.device)
    return m.sum(-1, dtype=torch.uint8)


def _block_offsets(mask: torch.Tensor) -> torch.Tensor:
    """[rows, cols] bool -> [rows, ceil(cols/B)] int32 exclusive prefix counts per column block."""
    rows, cols = mask.shape
    nblocks = (cols + BLOCK_COLS - 1) // BLOCK_COLS
    pad = nblocks * BLOCK_COLS - cols
    m = torch.nn.functional.pad(mask, (0, pad)) if pad else mask
    counts = m.reshape(rows, nblocks, BLOCK_COLS).sum(-1, dtype=torch.int64)
    return (counts.cumsum(1) - counts).to(torch.int32)


def encode(w: torch.Tensor) -> BitmapTensor:
    """Encode a 2-D bf16/fp16/fp32 matrix. Exact: decode(encode(w)) == w bit for bit, except -0.0 -> +0.0."""
    if w.dim() != 2:
        raise FormatError(f"encode: expected a 2-D matrix, got shape {list(w.shape)}")
    if w.dtype not in VALUE_DTYPES:
        raise FormatError(f"encode: unsupported dtype {w.dtype} (expected bfloat16, float16 or float32)")
    w = w.contiguous()
    mask = w != 0  # NaN != 0 is True: kept; -0.0 == 0: dropped
    counts = mask.sum(1, dtype=torch.int64)
    return BitmapTensor(
        shape=(w.shape[0], w.shape[1]),
        values=w[mask],  # row-major order
        bitmask=_pack(mask),
        row_offsets=counts.cumsum(0) - counts,
        block_offsets=_block_offsets(mask),
    )


def decode(bt: BitmapTensor, device=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference decompression to a dense [rows, cols] matrix on `device` (default: where bt lives).

    With `out`, writes into that preallocated tensor (shape and dtype must match) and returns it.
    """
    device = torch.device(device) if device is not None else bt.device
    if bt.device != device:
        bt = bt.to(device)
    rows, cols = bt.shape
    mask = _unpack(bt.bitmask, cols)
    if out is None:
        out = torch.zeros(rows, cols, dtype=bt.dtype, device=device)
    else:
        if tuple(out.shape) != (rows, cols) or out.dtype != bt.dtype:
            raise FormatError(f"decode: out is {out.dtype} {list(out.shape)}, expected {bt.dtype} {[rows, cols]}")
        out.zero_()
    # masked_scatter fills the True positions in row-major order: exactly the order of `values`.
    out.masked_scatter_(mask, bt.values)
    return out


def bitmap_nbytes(rows: int, cols: int, nnz: int, elem_bytes: int) -> int:
    """Stored bytes of the bitmap encoding (docs/FORMAT.md, 'Size')."""
    nblocks = (cols + BLOCK_COLS - 1) // BLOCK_COLS
    block = 4 * rows * nblocks if nblocks > 1 else 0  # block_offsets, stored for rows of several blocks
    return elem_bytes * nnz + rows * ((cols + 7) // 8) + 8 * rows + block + 16


def worth_encoding(rows: int, cols: int, nnz: int, elem_bytes: int) -> bool:
    """True when the bitmap encoding is strictly smaller than the dense bytes."""
    return bitmap_nbytes(rows, cols, nnz, elem_bytes) < rows * cols * elem_bytes


def bytes_per_element(fmt: str, sparsity: float, rows: int = 4096, cols: int = 4096, elem_bytes: int = 2) -> float:
    """Bytes per matrix element of a format at a sparsity (for the comparison table in FORMAT.md)."""
    n = rows * cols
    nnz = round(n * (1 - sparsity))
    if fmt == "dense":
        total = n * elem_bytes
    elif fmt == "csr":  # values + int32 column index per non-zero + int32 row pointers
        total = nnz * (elem_bytes + 4) + 4 * (rows + 1)
    elif fmt == "coo":  # values + int32 (row, col) per non-zero
        total = nnz * (elem_bytes + 8)
    elif fmt == "bitmap":
        total = bitmap_nbytes(rows, cols, nnz, elem_bytes)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return total / n


def format_table(sparsities=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> str:
    """The Markdown table of docs/FORMAT.md, computed."""
    lines = [
        "| sparsity | dense | CSR (int32) | COO (int32) | bitmap (this) | bitmap / dense |",
        "|---|---|---|---|---|---|",
    ]
    for s in sparsities:
        d, c, o, b = (bytes_per_element(f, s) for f in ("dense", "csr", "coo", "bitmap"))
        lines.append(f"| {s:.1f} | {d:.3f} | {c:.3f} | {o:.3f} | {b:.3f} | {b / d:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Print the bytes-per-element comparison table of docs/FORMAT.md")
    ap.add_argument("--table", action="store_true")
    ap.parse_args()
    print(format_table())
