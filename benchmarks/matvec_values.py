"""Decode-step kernel speed by value encoding: one decoder layer's matrices, bitmap bf16 vs int8 vs int4.

    python benchmarks/matvec_values.py                       # TinyLlama-1.1B layer shapes, 50% sparse, 2 threads
    python benchmarks/matvec_values.py --hidden 4096 --intermediate 11008 --kv 4096 --threads 1 2

Each round runs the seven matrices of `--layers` layers (q, k, v, o, gate, up, down) once per encoding at
batch 1 with bf16 x, the encodings interleaved inside every round so that a noisy machine slows
them alike; the result is the median over rounds. "GB/s" is the bytes of W the kernel reads
(values or codes + scales + zero points, bitmask, row offsets) divided by the time: the effective
weight bandwidth. Dense torch bf16 linear over the same matrices is the reference point. Every
encoding is checked against the reference decode before timing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import sparseferry.kernels as K
from sparseferry.format import decode, encode
from sparseferry.kernels.reference import sparse_matmul_reference
from sparseferry.quant import quantize


def layer_shapes(hidden: int, intermediate: int, kv: int) -> list[tuple[int, int]]:
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
            (intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]


def nbytes(bt) -> int:
    parts = [bt.values, bt.bitmask, bt.row_offsets] + [getattr(bt, p) for p in ("scales", "zeros") if getattr(bt, p, None) is not None]
    return sum(p.numel() * p.element_size() for p in parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--kv", type=int, default=256)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4,
                    help="distinct layers cycled through (default 4: more bytes than a 32 MiB L3, so W comes"
                         " from memory as in a decode step, not from the cache)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by the process's CPU time, not the wall clock (on a loaded machine, at 1 thread:"
                         " the time the kernel really ran, without the waits for a core)")
    args = ap.parse_args()
    print(f"kernel path {K.kernel_path('cpu')}, load average {os.getloadavg()[0]:.1f}")

    g = torch.Generator().manual_seed(0)
    dense, enc = [], {"bf16": [], "int8": [], "int4": []}
    for rows, cols in layer_shapes(args.hidden, args.intermediate, args.kv) * args.layers:
        w = torch.randn(rows, cols, generator=g)
        w[torch.rand(rows, cols, generator=g) < args.sparsity] = 0
        w = w.to(torch.bfloat16)
        dense.append(w)
        enc["bf16"].append(encode(w))
        enc["int8"].append(quantize(w, "int8", args.group_size))
        enc["int4"].append(quantize(w, "int4", args.group_size))
    x = {c: torch.randn(args.batch, c).to(torch.bfloat16) for c in {args.hidden, args.intermediate}}

    for name, bts in enc.items():  # validate against the reference decode
        for bt in bts:
            xx = x[bt.shape[1]]
            got, want = K.sparse_matmul(xx, bt).float(), sparse_matmul_reference(xx, bt).float()
            assert torch.allclose(got, want, rtol=2e-2, atol=1e-2 * float(want.abs().max())), name

    systems = {f"bitmap {n}": (lambda bts=bts: [K.sparse_matmul(x[bt.shape[1]], bt) for bt in bts]) for n, bts in enc.items()}
    systems["dense torch bf16"] = lambda: [torch.nn.functional.linear(x[w.shape[1]], w) for w in dense]
    sizes = {f"bitmap {n}": sum(map(nbytes, bts)) for n, bts in enc.items()}
    sizes["dense torch bf16"] = sum(w.numel() * 2 for w in dense)
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = {s: [] for s in systems}
        for fn in systems.values():
            fn()
        clock = time.process_time if args.cpu_time else time.perf_counter
        for _ in range(args.rounds):
            for s, fn in systems.items():
                t0 = clock()
                fn()
                times[s].append(clock() - t0)
        print(f"threads {threads}, batch {args.batch}, {'CPU' if args.cpu_time else 'wall'} time,"
              f" load average {os.getloadavg()[0]:.1f}:")
        base = statistics.median(times["bitmap bf16"])
        for s, ts in times.items():
            t = statistics.median(ts)
            print(f"  {s:18s} {sizes[s] / 1e6 / args.layers:8.1f} MB  {t * 1e3 / args.layers:7.3f} ms/layer"
                  f"  {sizes[s] / t / 1e9:6.1f} GB/s"
                  f"  {base / t:5.2f}x bitmap bf16")


if __name__ == "__main__":
    main()
