"""The machine's own ceilings, measured in the same run as the systems: disk read and memory bandwidth.

`disk_read_gbps` reads the model's files with O_DIRECT (page cache bypassed; where O_DIRECT is
refused the pages are dropped before and after) at several queue depths and request sizes and
keeps the best: the fastest way any offloading engine can get bytes off this disk, not just what
one request stream (`dd iflag=direct`) gets. `memory_gbps` times a read of a large tensor. From them,
`bound_s_per_step` gives the lower bound on the time of one decode step of a system that must read
`disk_bytes` from the disk and `ram_bytes` from memory per step: the two can overlap, so the bound
is the larger of the two transfer times, not their sum.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..io import FileReader, aligned_empty, drop_cache

BLOCK = 32 << 20  # bytes per read_range call (about one layer of a 1B model)
DEPTHS = (1, 2, 4, 8, 16)  # requests in flight tried by disk_read_gbps
CHUNKS = (256 << 10, 1 << 20, 4 << 20)  # request sizes tried


def _files(paths) -> list[Path]:
    out = []
    for p in paths:
        p = Path(p)
        out += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return out


def disk_read_gbps(paths, *, max_bytes: int = 2 << 30, block: int = BLOCK, depths=DEPTHS, chunks=CHUNKS) -> dict:
    """The disk's read ceiling on the files under `paths`: the best of several queue depths and request sizes.

    For each (depth, chunk) pair, reads `block`-byte ranges one after another, each split into
    `chunk`-byte O_DIRECT requests with `depth` in flight (io.FileReader, the runtime's own reader),
    continuing through the files (largest first, wrapping around) for a share of `max_bytes`
    (at least one block, at most the files' size). A single stream (depth 1) is what `dd iflag=direct` measures; an SSD
    usually needs several requests in flight to reach its limit.
    Returns {"GBps": the best pair's decimal GB per second, "depth", "chunk" of that pair, "bytes",
    "seconds" (that pair's), "direct": whether O_DIRECT was used, "sweep": [{"depth", "chunk", "GBps"}]}.
    """
    files = sorted(_files(paths), key=lambda f: f.stat().st_size, reverse=True)
    files = [f for f in files if f.stat().st_size > 0]
    drop_cache(files)
    pairs = [(d, c) for d in depths for c in chunks if c <= block]
    total = sum(f.stat().st_size for f in files)
    share = min(max(block, max_bytes // max(len(pairs), 1)), total)  # no byte twice within one pair
    buf = aligned_empty(block)
    cursor = [0, 0]  # file index, offset: every pair reads bytes the previous ones did not (until wrap-around)
    direct, sweep, best = True, [], None
    for depth, chunk in pairs:
        done, t0 = 0, time.perf_counter()
        while done < share and files:
            f = files[cursor[0]]
            with FileReader(f, direct=True, depth=depth, chunk=chunk) as r:
                direct &= r.direct
                while cursor[1] < r.size and done < share:
                    end = min(cursor[1] + block, r.size)
                    r.read_range(cursor[1], end, buf)
                    done += end - cursor[1]
                    cursor[1] = end
            if cursor[1] >= r.size:
                cursor[0], cursor[1] = (cursor[0] + 1) % len(files), 0
                if cursor[0] == 0:
                    drop_cache(files)  # buffered fallback: the pages of a wrapped-around file
        secs = time.perf_counter() - t0
        gbps = done / secs / 1e9 if secs > 0 else 0.0
        sweep.append({"depth": depth, "chunk": chunk, "GBps": gbps})
        if best is None or gbps > best["GBps"]:
            best = {"GBps": gbps, "depth": depth, "chunk": chunk, "bytes": done, "seconds": secs}
    drop_cache(files)
    best = best or {"GBps": 0.0, "depth": 1, "chunk": block, "bytes": 0, "seconds": 0.0}
    return {**best, "direct": direct, "sweep": sweep}


def memory_gbps(nbytes: int = 1 << 30, reps: int = 5) -> dict:
    """Host memory read bandwidth: the best of `reps` sums over an `nbytes` fp32 tensor (torch's
    threads), bytes read per second. A decode step reads its weights once and writes almost
    nothing, so this, not a copy, is its ceiling. "copy_GBps" is also given: a tensor copy with
    bytes read + written counted, which on this kind of machine comes out about a quarter lower.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32)  # pages faulted in by the fill
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t)
    half = src[: src.numel() // 2]
    dst = torch.empty_like(half)
    dst.copy_(half)
    copy = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(half)
        copy = min(copy, time.perf_counter() - t)
    return {"GBps": nbytes / best / 1e9, "bytes": nbytes, "seconds": best,
            "copy_GBps": 2 * half.numel() * 4 / copy / 1e9}


def bound_s_per_step(disk_bytes: float, ram_bytes: float, disk_gbps: float, mem_gbps: float) -> float:
    """Lower bound on one decode step: max(disk bytes / disk bandwidth, RAM bytes / memory bandwidth)."""
    disk_s = disk_bytes / (disk_gbps * 1e9) if disk_gbps > 0 else 0.0
    ram_s = ram_bytes / (mem_gbps * 1e9) if mem_gbps > 0 else 0.0
    return max(disk_s, ram_s)
