"""`sparseferry bench`: sparseferry against HuggingFace Accelerate offloading, next to the machine's physical bound.

    harness               prepare models, measure ceilings, run each system in its own process, sweep
    accelerate_baseline   the pinned baseline worker (transformers + Accelerate disk offload)
    sparseferry_runner    the sparseferry worker
    measure               the timing both workers share (forward-pass hooks, /proc/self/io, repetitions)
    ceilings              disk read and memory bandwidth, the per-token lower bound
    report                results.json, the Markdown table, the plots
"""
from .harness import SYSTEMS, BenchError, System, bench, select_systems, sweep

__all__ = ["SYSTEMS", "BenchError", "System", "bench", "select_systems", "sweep"]
