"""Quantized non-zero values (docs/FORMAT.md, section 1b): the quantizers and the reference dequantization.

The bitmap keeps the sparsity pattern exact; only the values are approximated:

    int8  symmetric, per group:  s = max|v| / 127 rounded UP to fp16,  code = round(v / s)       in [-127, 127]
    int4  asymmetric, per group: s = (hi - lo) / 15 rounded UP to fp16, with lo = min(min v, 0),
                                 hi = max(max v, 0);  z = round(-lo / s) in [0, 15],
                                 code = clamp(round(v / s + z), 0, 15)
    value = (code - z) * s  (z = 0 for int8), in fp32, rounded once to the matrix dtype

Groups are runs of G consecutive non-zeros of one row (the last run of a row is short), or whole
rows (G = 0). Rounding the scale up is what makes the bound hold for the scale as stored: no code
clamps, so |v - (code - z) * s| <= s / 2 for every value (up to the float64 rounding of the
division v / s here: a relative 2**-49 of s at most). The dequantized product is exact in fp32 (an
integer of at most 8 bits times an fp16); the only other error is the final rounding to the
matrix dtype, half an ulp of that dtype. `decode_quant` is the slow, obviously correct reference
every kernel path is tested against.
"""
from __future__ import annotations

import torch

from .errors import SparseferryError
from .format import (
    QUANT_FORMATS,
    SCALE_DTYPE,
    VALUE_DTYPES,
    BitmapTensor,
    QuantBitmapTensor,
    encode,
    group_offsets,
    num_groups,
)

# Non-zeros per scale by default. int8 keeps its quality with long groups (SmolLM2-135M, 50% Wanda:
# perplexity 23.52 with 128, 23.51 with 512, 23.54 per row; bf16 23.44), and its fused kernel does
# fewer group splits with them; int4 needs short ones.
DEFAULT_GROUP_SIZES = {"int8": 512, "int4": 128}
INT8_MAX = 127  # symmetric: -127..127 (never -128, so the grid is symmetric around 0)
INT4_MAX = 15  # asymmetric: 0..15


def default_group_size(value_format: str) -> int:
    """The group size `quantize` uses for `value_format` ("int8" / "int4") when none is given."""
    return DEFAULT_GROUP_SIZES[value_format]


class QuantError(SparseferryError):
    """A matrix cannot be quantized (non-finite values, or values beyond what an fp16 scale reaches)."""


def value_groups(row_offsets: torch.Tensor, nnz: int, group_size: int, cols: int) -> torch.Tensor:
    """[nnz] int64: the group (index in `scales`) of every non-zero value, in value order."""
    rows = row_offsets.numel()
    dev = row_offsets.device
    ends = torch.cat([row_offsets[1:], torch.tensor([nnz], dtype=torch.int64, device=dev)])
    row = torch.repeat_interleave(torch.arange(rows, device=dev), ends - row_offsets)  # [nnz] row of each value
    k = torch.arange(nnz, device=dev) - row_offsets[row]  # position among its row's non-zeros
    g = group_size if group_size > 0 else max(cols, 1)
    return group_offsets(row_offsets, nnz, group_size, cols)[row] + torch.div(k, g, rounding_mode="floor")


def fp16_at_least(s: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 >= s, elementwise (s: float64, >= 0). Above the fp16 range: +inf."""
    t = s.to(torch.float16)  # round to nearest
    low = t.double() < s
    return torch.where(low, torch.nextafter(t, torch.full_like(t, float("inf"))), t)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[n] codes in 0..15 -> [ceil(n/2)] uint8; code 2k in the low nibble of byte k, 2k+1 in the high one."""
    q = q.to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])  # an odd count leaves the last high nibble 0
    return q[0::2] | (q[1::2] << 4)


def unpack_int4(codes: torch.Tensor, n: int) -> torch.Tensor:
    """[ceil(n/2)] uint8 -> [n] uint8 codes (inverse of pack_int4)."""
    return torch.stack([codes & 0xF, codes >> 4], dim=1).reshape(-1)[:n]


def quantize(bt: BitmapTensor | torch.Tensor, value_format: str, group_size: int | None = None,
             name: str = "tensor") -> QuantBitmapTensor:
    """Quantize the non-zero values of a bitmap matrix (or of a dense matrix, encoded first).

    Args:
        bt: a BitmapTensor (its pattern is kept exactly) or a 2-D bf16/fp16/fp32 matrix.
        value_format: "int8" (symmetric) or "int4" (asymmetric with a zero point).
        group_size: non-zeros per group, counted along each row; 0 = one group (one scale) per row;
            None = the format's default (`default_group_size`: 512 for int8, 128 for int4).
        name: named in errors.
    Returns:
        a QuantBitmapTensor whose out_dtype is bt's dtype.
    Raises:
        QuantError for NaN/Inf values, or a group whose scale exceeds the fp16 range (|v| > ~8e6),
        or whose dequantized values overflow the matrix dtype.
    """
    if not isinstance(bt, BitmapTensor):
        bt = encode(bt)
    if value_format not in QUANT_FORMATS:
        raise QuantError(f"{name}: unknown value format {value_format!r} (expected one of {', '.join(QUANT_FORMATS)})")
    if group_size is None:
        group_size = default_group_size(value_format)
    if not isinstance(group_size, int) or group_size < 0:
        raise QuantError(f"{name}: group size {group_size!r} must be a non-negative integer (0 = one group per row)")
    rows, cols = bt.shape
    nnz = bt.nnz
    v = bt.values.double()  # exact for bf16/fp16/fp32
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        raise QuantError(f"{name}: {int(bad.sum())} non-finite values (NaN/Inf) cannot be quantized; "
                         f"store this matrix with float values")
    ngroups = num_groups(bt.row_offsets, nnz, group_size, cols)
    gid = value_groups(bt.row_offsets, nnz, group_size, cols)
    zero_g = torch.zeros(ngroups, dtype=torch.float64, device=v.device)
    if value_format == "int8":
        amax = zero_g.scatter_reduce(0, gid, v.abs(), "amax")  # > 0: every value is non-zero
        scales = fp16_at_least(amax / INT8_MAX)
        _check_scales(scales, name)
        q = torch.round(v / scales.double()[gid]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        codes, zeros = q, None
    else:
        lo = zero_g.scatter_reduce(0, gid, v, "amin")  # include_self: the range always holds 0
        hi = zero_g.scatter_reduce(0, gid, v, "amax")
        scales = fp16_at_least((hi - lo) / INT4_MAX)
        _check_scales(scales, name)
        s = scales.double()
        zeros = torch.round(-lo / s).clamp_(0, INT4_MAX).to(torch.uint8)
        q = torch.round(v / s[gid] + zeros.double()[gid]).clamp_(0, INT4_MAX)
        codes = pack_int4(q)
    qbt = QuantBitmapTensor(bt.shape, codes, bt.bitmask, bt.row_offsets, bt.block_offsets, scales, zeros,
                            value_format, group_size, bt.dtype, nnz,
                            group_offsets(bt.row_offsets, nnz, group_size, cols))
    if nnz and not bool(torch.isfinite(dequantize_values(qbt).to(bt.dtype)).all()):
        raise QuantError(f"{name}: dequantized values overflow {bt.dtype} (values within a scale step of the "
                         f"{bt.dtype} range); store this matrix with float values")
    return qbt


def _check_scales(scales: torch.Tensor, name: str) -> None:
    if bool(torch.isinf(scales).any()):
        g = int(torch.isinf(scales).nonzero()[0])
        raise QuantError(f"{name}: group {g} spans values too large for an fp16 scale (> {65504 * INT8_MAX:.3g} "
                         f"for int8); store this matrix with float values")


def dequantize_values(qbt: QuantBitmapTensor) -> torch.Tensor:
    """[nnz] fp32: (code - zero) * scale of every non-zero (exact in fp32), before rounding to out_dtype."""
    from .format import check_row_spans

    rows, cols = qbt.shape
    check_row_spans(qbt)  # before value_groups: a row span past nnz would index outside codes and scales
    gid = value_groups(qbt.row_offsets, qbt.nnz, qbt.group_size, cols)
    if qbt.value_format == "int8":
        q = qbt.values.to(torch.float32)
    else:
        q = unpack_int4(qbt.values, qbt.nnz).to(torch.float32) - qbt.zeros.to(torch.float32)[gid]
    return q * qbt.scales.to(torch.float32)[gid]


def decode_quant(qbt: QuantBitmapTensor, device=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference dequantizing decompression: dense [rows, cols] of qbt.out_dtype on `device`.

    Zeros of the bitmap are exact zeros; every set bit holds its dequantized value rounded to
    out_dtype (which may itself be 0: the position still counts as a non-zero of the pattern).
    With `out`, fills that preallocated tensor (shape and dtype must match) and returns it.
    """
    from .format import scatter_values

    device = torch.device(device) if device is not None else qbt.device
    if qbt.device != device:
        qbt = qbt.to(device)
    return scatter_values(qbt, dequantize_values(qbt).to(qbt.out_dtype), out)


def relative_error(reference: BitmapTensor | torch.Tensor, qbt: QuantBitmapTensor) -> float:
    """||W - decode(qbt)||_F / ||W||_F in float64 (0 for an all-zero W); W given dense or as its BitmapTensor."""
    v = reference.values if isinstance(reference, BitmapTensor) else reference[reference != 0]
    v = v.double()
    vhat = dequantize_values(qbt).to(qbt.out_dtype).double()
    den = float(torch.linalg.vector_norm(v))
    return float(torch.linalg.vector_norm(v - vhat)) / den if den else 0.0


__all__ = ["DEFAULT_GROUP_SIZES", "default_group_size", "QuantError", "decode_quant", "dequantize_values", "fp16_at_least", "pack_int4",
           "quantize", "relative_error", "unpack_int4", "value_groups", "SCALE_DTYPE", "VALUE_DTYPES"]
