"""Triton decompression for CUDA tensors: one program per (row, column block of BLOCK_COLS).

Each program needs no scan over the rest of the row: `block_offsets[r, b]` (docs/FORMAT.md) gives
where its block's values start. Inside the block it unpacks the mask bits, turns them into value
indices with an exclusive prefix sum (tl.cumsum) and gathers. Values are moved as 16/32-bit
integers, so NaN payloads and every other bit pattern are copied exactly.

Quantized values (`QuantBitmapTensor`) take a second kernel of the same shape that, instead of
moving values, computes each one from its code, its group's scale and zero point:
(code - zero) * scale in fp32 (exact), rounded once to the output dtype.

Importing this module imports triton; `sparseferry.kernels` does so only for CUDA tensors. With
TRITON_INTERPRET=1 set before triton is first imported, the same kernel runs on CPU tensors in
Triton's interpreter (that is how the tests check it on machines without a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..format import BLOCK_COLS, BitmapTensor, FormatError, QuantBitmapTensor, check_row_spans, num_groups

_AS_INT = {2: torch.int16, 4: torch.int32}  # element size -> integer dtype of the same width


@triton.jit
def _decompress_block(values, bitmask, row_offsets, block_offsets, out, cols, mask_stride, nblocks,
                      BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)  # int64: rows * cols may exceed 2**31
    b = tl.program_id(1)
    c = b * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] column indices of this block
    inside = c < cols
    byte = tl.load(bitmask + r * mask_stride + c // 8, mask=inside, other=0).to(tl.int32)
    bit = (byte >> (c % 8)) & 1  # [BLOCK] 1 where W[r, c] != 0
    idx = tl.cumsum(bit, axis=0) - bit  # exclusive prefix sum: index of each set bit's value in the block
    base = tl.load(row_offsets + r) + tl.load(block_offsets + r * nblocks + b).to(tl.int64)
    v = tl.load(values + base + idx, mask=inside & (bit != 0), other=0)
    tl.store(out + r * cols + c, v, mask=inside)


@triton.jit
def _decompress_quant_block(codes, scales, zeros, group_offsets, bitmask, row_offsets, block_offsets, out, cols,
                            mask_stride, nblocks, group_size, INT4: tl.constexpr, OUT_BF16: tl.constexpr,
                            BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    c = b * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] column indices of this block
    inside = c < cols
    byte = tl.load(bitmask + r * mask_stride + c // 8, mask=inside, other=0).to(tl.int32)
    bit = (byte >> (c % 8)) & 1
    k = tl.load(block_offsets + r * nblocks + b).to(tl.int64) + (tl.cumsum(bit, axis=0) - bit)  # index in the row
    i = tl.load(row_offsets + r) + k  # [BLOCK] global value index
    live = inside & (bit != 0)
    g = tl.load(group_offsets + r) + k // group_size  # [BLOCK] group of each value
    scale = tl.load(scales + g, mask=live, other=0).to(tl.float32)
    if INT4:  # value i: nibble i & 1 (low first) of byte i // 2, minus its group's zero point
        q = (tl.load(codes + i // 2, mask=live, other=0).to(tl.int32) >> ((i % 2) * 4).to(tl.int32)) & 15
        q = q - tl.load(zeros + g, mask=live, other=0).to(tl.int32)
    else:
        q = tl.load(codes + i, mask=live, other=0).to(tl.int32)
    v = tl.where(live, q.to(tl.float32) * scale, 0.0)  # exact in fp32; positions off the bitmap are 0
    if OUT_BF16:  # round to nearest even on the bits (out is viewed as int16), the same on every backend
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        tl.store(out + r * cols + c, u.to(tl.uint16).to(tl.int16, bitcast=True), mask=inside)
    else:  # fp16 (round to nearest even) or fp32 (as is)
        tl.store(out + r * cols + c, v.to(out.dtype.element_ty), mask=inside)


def decompress(bt: BitmapTensor, out: torch.Tensor) -> torch.Tensor:
    """Fill `out` ([rows, cols], bt's dtype and device, contiguous: checked by the caller) with the decode of bt.

    The kernel itself trusts the offsets (one program per block cannot see its whole row), so they
    are checked first, on the device: row_offsets and block_offsets against the bitmask's bit
    counts, and (quantized) the scale count against the row spans (`format.check_row_spans`).
    """
    rows, cols = bt.shape
    nblocks = (cols + BLOCK_COLS - 1) // BLOCK_COLS
    if rows == 0 or cols == 0:
        return out
    check_row_spans(bt, blocks=True)
    if isinstance(bt, QuantBitmapTensor) and bt.scales.numel() != num_groups(bt.row_offsets, bt.nnz, bt.group_size, cols):
        raise FormatError(f"quantized bitmap matrix [{rows}, {cols}]: {bt.scales.numel()} scales, its row spans need "
                          f"{num_groups(bt.row_offsets, bt.nnz, bt.group_size, cols)}")
    if isinstance(bt, QuantBitmapTensor):
        g = bt.group_size if bt.group_size > 0 else max(cols, 1)
        int4 = bt.value_format == "int4"
        _decompress_quant_block[(rows, nblocks)](
            bt.values.contiguous(), bt.scales.contiguous(), (bt.zeros if int4 else bt.scales).contiguous(),
            bt.group_offsets.contiguous(), bt.bitmask.contiguous(), bt.row_offsets.contiguous(),
            bt.block_offsets.contiguous(), out.view(torch.int16) if out.dtype == torch.bfloat16 else out, cols,
            (cols + 7) // 8, nblocks, g, INT4=int4, OUT_BF16=out.dtype == torch.bfloat16, BLOCK=BLOCK_COLS,
        )
        return out
    as_int = _AS_INT[bt.values.element_size()]
    grid = (rows, nblocks)
    _decompress_block[grid](
        bt.values.contiguous().view(as_int), bt.bitmask.contiguous(), bt.row_offsets.contiguous(),
        bt.block_offsets.contiguous(), out.view(as_int), cols, (cols + 7) // 8, nblocks, BLOCK=BLOCK_COLS,
    )
    return out
