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
