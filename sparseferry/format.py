"""The bitmap sparse encoding of one matrix (docs/FORMAT.md, section 1), in plain torch.

`encode` and `decode` here are the reference: slow, obviously correct, any device. The fast
kernels in `sparseferry.kernels` are tested against them. `QuantBitmapTensor` is the same layout
with quantized non-zero values (int8 / int4 codes plus per-group scales, docs/FORMAT.md section 1b);
the quantizers and its reference dequantization live in `sparseferry.quant`.
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
# Quantized value formats (docs/FORMAT.md, 1b): name -> bits per code. Their parts replace
# `compressed` by `codes`, `scales` and (int4) `zeros`.
QUANT_FORMATS = {"int8": 8, "int4": 4}
QUANT_PARTS = ("shape", "codes", "scales", "zeros", "bitmask", "row_offsets", "block_offsets")
SCALE_DTYPE = torch.float16  # of P.scales (why fp16: docs/FORMAT.md, 1b)
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
        rows, cols = _check_layout(parts, name, ("shape", "compressed", "bitmask", "row_offsets"))
        values, bitmask, row_offsets = parts["compressed"], parts["bitmask"], parts["row_offsets"]
        if values.dtype not in VALUE_DTYPES or values.dim() != 1:
            raise FormatError(f"{name}.compressed: expected 1-D bf16/fp16/fp32, got {values.dtype} {list(values.shape)}")
        return cls((rows, cols), values, bitmask, row_offsets, _stored_block_offsets(parts, name, rows, cols))


def _check_layout(parts: dict[str, torch.Tensor], name: str, required) -> tuple[int, int]:
    """(rows, cols) from the shape part, after checking the parts common to both value kinds."""
    for p in required:
        if p not in parts:
            raise FormatError(f"{name}: missing part {name}.{p}")
    shp = parts["shape"]
    if shp.dtype != torch.int64 or shp.numel() != 2:
        raise FormatError(f"{name}.shape: expected int64 [2], got {shp.dtype} {list(shp.shape)}")
    rows, cols = (int(v) for v in shp.tolist())
    bitmask, row_offsets = parts["bitmask"], parts["row_offsets"]
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, (cols + 7) // 8):
        raise FormatError(f"{name}.bitmask: expected uint8 {[rows, (cols + 7) // 8]}, got {bitmask.dtype} {list(bitmask.shape)}")
    if row_offsets.dtype != torch.int64 or tuple(row_offsets.shape) != (rows,):
        raise FormatError(f"{name}.row_offsets: expected int64 [{rows}], got {row_offsets.dtype} {list(row_offsets.shape)}")
    return rows, cols


def _stored_block_offsets(parts: dict[str, torch.Tensor], name: str, rows: int, cols: int) -> torch.Tensor:
    """The block_offsets part, checked, or recomputed from the bitmask when it is not stored."""
    block_offsets = parts.get("block_offsets")
    bitmask = parts["bitmask"]
    nblocks = (cols + BLOCK_COLS - 1) // BLOCK_COLS
    if block_offsets is None:
        if nblocks <= 1:  # one column block: every block starts at its row's start
            return torch.zeros(rows, nblocks, dtype=torch.int32, device=bitmask.device)
        return _block_offsets(_unpack(bitmask, cols))
    if block_offsets.dtype != torch.int32 or tuple(block_offsets.shape) != (rows, nblocks):
        raise FormatError(f"{name}.block_offsets: expected int32 {[rows, nblocks]}, got {block_offsets.dtype} {list(block_offsets.shape)}")
    return block_offsets


def _groups_per_row(row_offsets: torch.Tensor, nnz: int, group_size: int, cols: int) -> torch.Tensor:
    """[rows] int64: ceil(n_r / G), G = group_size, or cols for group_size 0 (one group per non-empty row)."""
    g = group_size if group_size > 0 else max(cols, 1)
    ends = torch.cat([row_offsets[1:], torch.tensor([nnz], dtype=torch.int64, device=row_offsets.device)])
    return torch.div(ends - row_offsets + (g - 1), g, rounding_mode="floor")


def group_offsets(row_offsets: torch.Tensor, nnz: int, group_size: int, cols: int) -> torch.Tensor:
    """[rows] int64: index in `scales` of the first group of each row (docs/FORMAT.md, 1b).

    Row r's n_r non-zeros fall in ceil(n_r / G) groups, the last one short; G = group_size, or cols
    for group_size 0 (one group per non-empty row).
    """
    ngroups = _groups_per_row(row_offsets, nnz, group_size, cols)
    return ngroups.cumsum(0) - ngroups


def num_groups(row_offsets: torch.Tensor, nnz: int, group_size: int, cols: int) -> int:
    """Length of `scales`: the sum over rows of ceil(n_r / G)."""
    return int(_groups_per_row(row_offsets, nnz, group_size, cols).sum())


@dataclass
class QuantBitmapTensor(BitmapTensor):
    """A bitmap matrix whose non-zero values are stored quantized (docs/FORMAT.md, section 1b).

    The positions (bitmask, row_offsets, block_offsets) are exactly those of `BitmapTensor`; the
    value of the i-th non-zero, in group g = group_offsets[r] + (i - row_offsets[r]) // G, is
        int8:  codes[i] * scales[g]                    (codes int8 [nnz], symmetric, |code| <= 127)
        int4:  (nibble(i) - zeros[g]) * scales[g]      (codes uint8 [ceil(nnz/2)], value i in the
                                                        low nibble of byte i//2 when i is even)
    computed in fp32 (exact: an 8-bit integer times an fp16) and rounded once to `out_dtype`.

    values:        the codes (int8 [nnz] or uint8 [ceil(nnz/2)])
    scales:        [ngroups] fp16
    zeros:         [ngroups] uint8 in [0, 15] (int4), None (int8)
    value_format:  "int8" | "int4"
    group_size:    G, values per group counted over a row's non-zeros; 0 = one group per row
    out_dtype:     the dense dtype decode and the kernels produce (the source matrix's)
    count:         nnz, the number of non-zeros (set bits)
    group_offsets: [rows] int64, derived from row_offsets (see `group_offsets`), never stored
    """

    scales: torch.Tensor
    zeros: torch.Tensor | None
    value_format: str
    group_size: int
    out_dtype: torch.dtype
    count: int
    group_offsets: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.out_dtype

    @property
    def nnz(self) -> int:
        return self.count

    @property
    def qbits(self) -> int:
        return QUANT_FORMATS[self.value_format]

    @property
    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.out_dtype.itemsize

    @property
    def device(self) -> torch.device:
        return self.bitmask.device

    def to(self, device, non_blocking: bool = False) -> "QuantBitmapTensor":
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return QuantBitmapTensor(self.shape, mv(self.values), mv(self.bitmask), mv(self.row_offsets),
                                 mv(self.block_offsets), mv(self.scales), mv(self.zeros), self.value_format,
                                 self.group_size, self.out_dtype, self.count, mv(self.group_offsets))

    def parts(self) -> dict[str, torch.Tensor]:
        """The stored tensors: shape, codes, scales, zeros (int4), bitmask, row_offsets, block_offsets (wide rows)."""
        parts = {"shape": torch.tensor(self.shape, dtype=torch.int64), "codes": self.values, "scales": self.scales}
        if self.zeros is not None:
            parts["zeros"] = self.zeros
        parts["bitmask"] = self.bitmask
        parts["row_offsets"] = self.row_offsets
        if self.block_offsets.shape[1] > 1:
            parts["block_offsets"] = self.block_offsets
        return parts

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], name: str = "tensor", *, value_format: str = "int8",
                   group_size: int = 0, out_dtype: torch.dtype = torch.bfloat16, nnz: int = 0) -> "QuantBitmapTensor":
        """Assemble from stored parts plus the manifest's value_format, group_size, dtype and nnz; checks every shape."""
        if value_format not in QUANT_FORMATS:
            raise FormatError(f"{name}: unknown value encoding {value_format!r} (expected one of {', '.join(QUANT_FORMATS)})")
        if out_dtype not in VALUE_DTYPES:
            raise FormatError(f"{name}: dequantized dtype {out_dtype} unsupported (expected bf16, fp16 or fp32)")
        if not isinstance(group_size, int) or group_size < 0:
            raise FormatError(f"{name}: group_size {group_size!r} must be a non-negative integer (0 = per row)")
        int4 = value_format == "int4"
        rows, cols = _check_layout(parts, name, ("shape", "codes", "scales", "bitmask", "row_offsets") + (("zeros",) if int4 else ()))
        codes, scales, row_offsets = parts["codes"], parts["scales"], parts["row_offsets"]
        want = (torch.uint8, (nnz + 1) // 2) if int4 else (torch.int8, nnz)
        if codes.dtype != want[0] or tuple(codes.shape) != (want[1],):
            raise FormatError(f"{name}.codes: expected {want[0]} [{want[1]}] for {nnz} {value_format} values, got {codes.dtype} {list(codes.shape)}")
        ngroups = num_groups(row_offsets, nnz, group_size, cols)
        if scales.dtype != SCALE_DTYPE or tuple(scales.shape) != (ngroups,):
            raise FormatError(f"{name}.scales: expected {SCALE_DTYPE} [{ngroups}], got {scales.dtype} {list(scales.shape)}")
        zeros = parts.get("zeros") if int4 else None
        if int4 and (zeros.dtype != torch.uint8 or tuple(zeros.shape) != (ngroups,)):
            raise FormatError(f"{name}.zeros: expected uint8 [{ngroups}], got {zeros.dtype} {list(zeros.shape)}")
        if int4 and zeros.numel() and int(zeros.max()) > 15:
            g = int((zeros > 15).nonzero()[0])
            raise FormatError(f"{name}.zeros: group {g} has zero point {int(zeros[g])}, expected 0..15 (a 4-bit code)")
        return cls((rows, cols), codes, parts["bitmask"], row_offsets, _stored_block_offsets(parts, name, rows, cols),
                   scales, zeros, value_format, group_size, out_dtype, nnz,
                   group_offsets(row_offsets, nnz, group_size, cols))


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

    A QuantBitmapTensor is dequantized on the way (`quant.decode_quant`), to its out_dtype.
    With `out`, writes into that preallocated tensor (shape and dtype must match) and returns it.
    """
    if isinstance(bt, QuantBitmapTensor):
        from .quant import decode_quant

        return decode_quant(bt, device=device, out=out)
    device = torch.device(device) if device is not None else bt.device
    if bt.device != device:
        bt = bt.to(device)
    return scatter_values(bt, bt.values, out)


def scatter_values(bt: BitmapTensor, values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense matrix with `values` (one per set bit, row-major, in bt.dtype) at bt's set bits, zeros
    elsewhere; into `out` (checked, zeroed first) when given. Shared by the plain and quantized decoders."""
    rows, cols = bt.shape
    if out is None:
        out = torch.zeros(rows, cols, dtype=bt.dtype, device=bt.device)
    else:
        if tuple(out.shape) != (rows, cols) or out.dtype != bt.dtype:
            raise FormatError(f"decode: out is {out.dtype} {list(out.shape)}, expected {bt.dtype} {[rows, cols]}")
        out.zero_()
    mask = _unpack(bt.bitmask, cols)
    check_row_spans(bt, mask, values.numel())
    # masked_scatter fills the True positions in row-major order: exactly the order of `values`.
    out.masked_scatter_(mask, values)
    return out


def check_row_spans(bt: BitmapTensor, mask: torch.Tensor | None = None, nvalues: int | None = None,
                    blocks: bool = False) -> None:
    """Raise FormatError unless every row's span in the values is exactly its set bits.

    row_offsets must be the exclusive prefix sum of the per-row bit counts and the last row must end
    at nnz (= the number of values; `nvalues` when given); with `blocks`, block_offsets must also be
    the per-row exclusive prefix counts of each column block (the GPU kernel trusts them). Every
    decoder path runs this check (the native kernels in C, per row) before it reads a value.
    """
    rows, cols = bt.shape
    if mask is None:
        mask = _unpack(bt.bitmask, cols)
    counts = mask.sum(1, dtype=torch.int64)
    want = counts.cumsum(0) - counts
    n = bt.nnz if nvalues is None else nvalues
    total = int(counts.sum()) if rows else 0
    if total != n or not torch.equal(bt.row_offsets.to(torch.int64), want):
        if total != n:
            why = f"the bitmask has {total} set bits, {n} values are stored"
        else:
            r = int((bt.row_offsets.to(torch.int64) != want).nonzero()[0])
            why = f"row {r} starts at value {int(bt.row_offsets[r])}, its set bits say {int(want[r])}"
        raise FormatError(f"bitmap matrix [{rows}, {cols}] (nnz {n}): row_offsets disagree with the bitmask: {why}")
    if blocks and (cols > BLOCK_COLS or bt.block_offsets.numel()):
        if not torch.equal(bt.block_offsets.to(torch.int32), _block_offsets(mask)):
            raise FormatError(f"bitmap matrix [{rows}, {cols}]: block_offsets disagree with the bitmask")


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
