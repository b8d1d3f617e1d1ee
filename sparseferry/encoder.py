"""Fast bitmap encoding of CPU matrices with numpy (the converter's and pruner's hot path).

Produces exactly what the reference `format.encode` produces (tested bit for bit); it is only
faster: numpy's packbits and boolean indexing on the integer view of the values run at hundreds of
MB/s where the torch formulation runs at tens. Other devices use the reference.
"""
from __future__ import annotations

import numpy as np
import torch

from .format import BLOCK_COLS, VALUE_DTYPES, BitmapTensor, encode

_INT_VIEW = {torch.bfloat16: (torch.int16, 0x7FFF), torch.float16: (torch.int16, 0x7FFF),
             torch.float32: (torch.int32, 0x7FFFFFFF)}
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def encode_fast(w: torch.Tensor) -> BitmapTensor:
    """`format.encode(w)`, bit for bit, faster for CPU tensors."""
    if w.device.type != "cpu" or w.dim() != 2 or w.dtype not in VALUE_DTYPES or 0 in w.shape:
        return encode(w)  # the reference (also raises the right FormatError)
    rows, cols = w.shape
    int_dtype, magnitude = _INT_VIEW[w.dtype]
    a = w.detach().contiguous().view(int_dtype).numpy()
    mask = (a & magnitude) != 0  # non-zero: any bit but the sign; NaN/Inf kept, -0.0 dropped
    nz = a[mask]  # row-major order
    values = torch.from_numpy(nz).view(w.dtype) if nz.size else torch.empty(0, dtype=w.dtype)
    bitmask = np.packbits(mask, axis=-1, bitorder="little")  # [rows, ceil(cols/8)]
    nblocks = (cols + BLOCK_COLS - 1) // BLOCK_COLS
    per_byte = _POPCOUNT[bitmask]
    counts = per_byte.sum(1)
    if nblocks > 1:
        bpb = BLOCK_COLS // 8  # bitmask bytes per column block
        padded = np.zeros((rows, nblocks * bpb), dtype=np.int64)
        padded[:, : per_byte.shape[1]] = per_byte
        block_counts = padded.reshape(rows, nblocks, bpb).sum(-1)
        block_offsets = (np.cumsum(block_counts, axis=1) - block_counts).astype(np.int32)
    else:
        block_offsets = np.zeros((rows, 1), dtype=np.int32)
    return BitmapTensor(
        shape=(rows, cols),
        values=values,
        bitmask=torch.from_numpy(bitmask),
        row_offsets=torch.from_numpy(np.cumsum(counts) - counts),
        block_offsets=torch.from_numpy(block_offsets),
    )
