"""Whole-layer expert parameters: every expert of a layer decoded into its fused [E, ...] parameter.

For a mixture-of-experts layer whose experts module is not a transformers fused-experts module
(Llama-4: it computes every expert on pre-sorted tokens), so that it streams whole: the checkpoint stores
each expert's slice on its own (docs/FORMAT.md, section 2b) and `Checkpoint.layer_views` hands an
expert parameter over as a list of E stored forms; this puts them back, one after another, into
the dense parameter transformers' experts module computes with. Every expert is decoded at every
use, whether the router picks it or not.
"""
from __future__ import annotations

import torch

from ..format import BitmapTensor


def whole_experts(stored: list, shape=None, out: torch.Tensor | None = None, decompress=None,
                  threads: int | None = None) -> torch.Tensor:
    """The dense expert parameter (of `shape`, default [E, *slice shape]) from its E per-expert stored forms.

    stored: BitmapTensor / QuantBitmapTensor / dense tensor per expert (all of one shape and dtype);
        expert e's slice is the e-th of E equal contiguous pieces of the parameter (docs/FORMAT.md 2b).
    out: where to write it (contiguous, E x the slice shape); None: a new tensor on the slices' device.
    decompress: the bitmap decompressor (default `sparseferry.kernels.decompress`).
    """
    if decompress is None:
        from ..kernels import decompress
    first = stored[0]
    if out is None:
        out = torch.empty((len(stored), *first.shape), dtype=first.dtype, device=first.device)
    for e, s in enumerate(stored):
        if isinstance(s, BitmapTensor):
            decompress(s, out=out[e], threads=threads)
        else:
            out[e].copy_(s, non_blocking=out.device.type == "cuda")
    return out.view(shape) if shape is not None else out
