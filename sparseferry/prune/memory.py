"""How much memory pruning needs, estimated before any weight is read, to honour a budget.

Pruning holds at once (all in the fp32 compute dtype unless said otherwise):
  layer        the largest decoder layer in fp32, plus its source-dtype copy while it is read and written;
  statistics   the per-linear statistics of that layer (SparseGPT: a [cols, cols] Hessian per linear;
               Wanda: a [cols] vector) plus the working set of pruning its largest matrix (scores,
               sort indices, mask; SparseGPT: the weight copy and the Cholesky factors); experts are
               pruned one at a time: one expert's statistics, plus the experts module's recorded
               inputs ([calibration tokens, hidden] and the top-k ids);
  activations  two [nsamples, seqlen, hidden] buffers (layer inputs and outputs) and the transient
               tensors of one sample's forward pass (MLP intermediate, attention scores);
  non_layer    the modules before layer 0 (embeddings...) in fp32, and the source-dtype tensors outside
               the layers (embeddings, final norm, lm_head) while they are copied to the output.
Interpreter and library code are not counted. The estimate errs on the high side.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

FP32 = 4


@dataclass
class MemoryEstimate:
    layer: int
    statistics: int
    activations: int
    non_layer: int

    @property
    def total(self) -> int:
        return self.layer + self.statistics + self.activations + self.non_layer

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _statistics(lin: dict[str, tuple[int, int]], method: str) -> int:
    """Bytes of the statistics of the linears `lin` ({name: (rows, cols)}) plus pruning the largest."""
    if not lin:
        return 0
    biggest = max(r * c for r, c in lin.values())
    widest = max(c for _, c in lin.values())
    if method == "sparsegpt":
        held = sum(c * c for _, c in lin.values()) * FP32  # one Hessian per linear
        work = biggest * FP32 * 2 + widest * widest * FP32 * 2 + biggest  # W copy, error, Cholesky factors, mask
    elif method == "wanda":
        held = sum(c for _, c in lin.values()) * 8
        work = biggest * (FP32 * 2 + 8 + 1)  # |W|, scores, sort indices (int64), mask
    else:
        held = 0
        work = biggest * (FP32 * 2 + 8 + 1)
    return held + work


def estimate_memory(*, layer_shapes: list[dict[str, tuple]], linear_shapes: list[dict[str, tuple[int, int]]],
                    non_layer_compute: int, non_layer_stored: int, source_itemsize: int, method: str,
                    nsamples: int, seqlen: int, hidden: int, heads: int, calibrated: bool,
                    expert_shapes: list[dict[str, tuple[int, int]]] | None = None, top_k: int = 8) -> MemoryEstimate:
    """Bytes needed, by component (see the module docstring).

    layer_shapes[i]: {parameter: shape} of decoder layer i; linear_shapes[i]: {linear weight: (rows, cols)}
    in the scoring orientation [out, in]; non_layer_compute: elements materialized before layer 0;
    non_layer_stored: source bytes of every tensor outside the layers; expert_shapes[i]: {matrix: (rows,
    cols)} of one expert of layer i's experts modules (experts are pruned one at a time: one expert's
    statistics are held, plus the experts' recorded inputs, [tokens, hidden] and [tokens, top_k] ids,
    and the intermediate of an expert that got every token).
    """
    layer_elems = max((sum(_numel(s) for s in shapes.values()) for shapes in layer_shapes), default=0)
    layer = layer_elems * (FP32 + source_itemsize)
    tokens = nsamples * seqlen if calibrated else 0
    per_layer = [_statistics(lin, method) for lin in linear_shapes]
    for i, one in enumerate(expert_shapes or []):
        if one:  # one expert at a time, next to the layer's linear statistics and the experts' recorded inputs
            widest = max(c for _, c in one.values())
            routed = tokens * (hidden * FP32 + top_k * 8 * 2 + widest * FP32 * 2)  # inputs, ids + sort, one expert's x, z
            per_layer[i] += _statistics(one, method) + routed
    stats = max(per_layer, default=0)
    acts = 0
    if calibrated:
        widest_out = max((r for lin in linear_shapes for r, _ in lin.values()), default=hidden)
        one_sample = seqlen * (hidden * 6 + widest_out * 3) * FP32 + heads * seqlen * seqlen * FP32 * 2
        acts = 2 * nsamples * seqlen * hidden * FP32 + one_sample
    return MemoryEstimate(layer=layer, statistics=stats, activations=acts,
                          non_layer=non_layer_compute * FP32 + non_layer_stored)
