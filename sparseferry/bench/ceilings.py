"""The machine's own ceilings, measured in the same run as the systems: disk read and memory bandwidth.

`disk_read_gbps` reads the model's files sequentially in large blocks with O_DIRECT (page cache
bypassed; where O_DIRECT is refused the pages are dropped before and after), the fastest way any
offloading engine can get bytes off this disk. `memory_gbps` times a large tensor copy. From them,
`bound_s_per_step` gives the lower bound on the time of one decode step of a system that must read
`disk_bytes` from the disk and `ram_bytes` from memory per step: the two can overlap, so the bound
is the larger of the two transfer times, not their sum.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..io import FileReader, aligned_empty, drop_cache

BLOCK = 16 << 20  # bytes per read: large enough that per-request latency is amortized


def _files(paths) -> list[Path]:
    out = []
    for p in paths:
        p = Path(p)
        out += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return out


def disk_read_gbps(paths, *, max_bytes: int = 2 << 30, block: int = BLOCK) -> dict:
    """Sequential read bandwidth of the files under `paths`, page cache bypassed.

    Reads whole files, largest first, until `max_bytes` (at least one block is read).
    Returns {"GBps": decimal GB per second, "bytes", "seconds", "direct": whether O_DIRECT was used}.
    """
    files = sorted(_files(paths), key=lambda f: f.stat().st_size, reverse=True)
    drop_cache(files)
    buf = aligned_empty(block)
    done, direct, t0 = 0, True, time.perf_counter()
    for f in files:
        with FileReader(f, direct=True) as r:
            direct &= r.direct
            off = 0
            while off < r.size and done < max_bytes:
                end = min(off + block, r.size)
                r.read_range(off, end, buf)
                done += end - off
                off = end
        if done >= max_bytes:
            break
    secs = time.perf_counter() - t0
    drop_cache(files)
    return {"GBps": done / secs / 1e9 if secs > 0 else 0.0, "bytes": done, "seconds": secs, "direct": direct}


def memory_gbps(nbytes: int = 512 << 20, reps: int = 5) -> dict:
    """Host memory bandwidth from the best of `reps` copies of an `nbytes` tensor.

    Counted as bytes read + bytes written (2 x nbytes per copy): a decode step reads its weights once,
    and a copy's read half runs at the rate a matrix-vector product streams weights.
    """
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return {"GBps": 2 * nbytes / best / 1e9, "bytes": nbytes, "seconds": best}


def bound_s_per_step(disk_bytes: float, ram_bytes: float, disk_gbps: float, mem_gbps: float) -> float:
    """Lower bound on one decode step: max(disk bytes / disk bandwidth, RAM bytes / memory bandwidth)."""
    disk_s = disk_bytes / (disk_gbps * 1e9) if disk_gbps > 0 else 0.0
    ram_s = ram_bytes / (mem_gbps * 1e9) if mem_gbps > 0 else 0.0
    return max(disk_s, ram_s)
