"""The pure-torch references the fast kernels are tested against (slow, obviously correct, any device).

Decompression's reference is `sparseferry.format.decode` itself; this adds the matmul.
"""
from __future__ import annotations

import torch

from ..format import BitmapTensor, decode


def sparse_matmul_reference(x: torch.Tensor, bt: BitmapTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) computed in fp32 from the dense decode, returned in x's dtype.

    x: [..., cols]; W = decode(bt): [rows, cols]; bias: [rows]; result [..., rows].
    """
    y = x.float() @ decode(bt, device=x.device).float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# int8 activations: the quantized-values matvec of the AVX2 and AVX-512 VNNI paths (csrc/matvec_qx.c, matvec_qx512.c)

X_BLOCK = 32  # columns of x per activation scale


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., cols] -> (xq [..., nblk * 32] int8, d [..., nblk] fp32), nblk = ceil(cols / 32).

    Per block of 32 columns (zero-padded): d = max|x| / 127 and xq = round_half_even(x / d), both in
    fp32 (0 where d == 0); a block holding Inf or NaN gets d = NaN and xq = 0.
    """
    xf = x.float()
    xf = torch.nn.functional.pad(xf, (0, (-xf.shape[-1]) % X_BLOCK)).reshape(*xf.shape[:-1], -1, X_BLOCK)
    finite = torch.isfinite(xf).all(-1)
    d = torch.where(finite, xf.abs().amax(-1) / 127, torch.full_like(xf[..., 0], float("nan")))
    use = (finite & (d > 0))[..., None]
    xq = torch.where(use, torch.round(xf / torch.where(use, d[..., None], 1)), 0).clamp(-127, 127)
    return xq.to(torch.int8).flatten(-2), d


def sparse_matmul_int8x_reference(x: torch.Tensor, qbt) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, bound) for y = x @ W.T as the int8-activation kernel defines it, in float64; x [batch, cols].

    y[b, r] = sum over the row's values i of scale[g_i] * d[b, col_i // 32] * w_i * xq[b, col_i], with
    w_i the integer code (int8) or nibble - zero (int4); the kernel sums the same terms in fp32, so
    it agrees within fp32 rounding of `bound` = the sum of the terms' magnitudes (also [batch, rows]).
    """
    from ..format import _unpack, check_row_spans
    from ..quant import unpack_int4, value_groups

    rows, cols = qbt.shape
    check_row_spans(qbt)
    gid = value_groups(qbt.row_offsets, qbt.nnz, qbt.group_size, cols)
    if qbt.value_format == "int8":
        w = qbt.values.to(torch.float64)
    else:
        w = unpack_int4(qbt.values, qbt.nnz).to(torch.float64) - qbt.zeros.to(torch.float64)[gid]
    w = w * qbt.scales.to(torch.float64)[gid]
    row, col = _unpack(qbt.bitmask, cols).nonzero(as_tuple=True)  # value order: row-major
    xq, d = quantize_activations(x)
    terms = w * xq[:, col].to(torch.float64) * d.to(torch.float64)[:, col // X_BLOCK]  # [batch, nnz]
    y = torch.zeros(x.shape[0], rows, dtype=torch.float64).index_add_(1, row, terms)
    bound = torch.zeros_like(y).index_add_(1, row, terms.abs())
    return y, bound
