"""Benchmark of the bitmap kernels against the torch baselines: validate, then time.

    python benchmarks/kernels.py                     # table, 1 and 2 threads, 4096x4096 and 11008x4096 bf16, 50% sparse
    python benchmarks/kernels.py --json              # one JSON object {"results": [...]} instead
    python benchmarks/kernels.py --crossover         # fused matvec vs decompress + linear, by batch size

For each shape, every kernel path is first checked against the reference (bit-exact decompression,
fp32-accurate matvec). Timings are the median of --repeats runs after a warm-up, with output
buffers reused (no first-touch page faults).
  decompress: GB/s = dense output bytes / time; baseline = format.decode (pure torch), and the
              memcpy of the same dense bytes is the ceiling.
  matvec:     batch-1 y = x @ W.T; GB/s = bytes of W read / time (compressed for ours, dense for
              the baseline torch.nn.functional.linear on the dense bf16 matrix); speedup = time ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import sparseferry.kernels as K
from sparseferry.format import decode, encode
from sparseferry.kernels import native

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sparse_matrix(rows: int, cols: int, sparsity: float, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    return w


def with_path(path: str):
    os.environ[K.ENV_VAR] = path


def validate(w: torch.Tensor, bt, paths: list[str]) -> None:
    want = decode(bt)
    x = torch.randn(1, w.shape[1]).to(w.dtype)
    ref = x.float() @ w.float().T
    for p in paths:
        with_path(p)
        got = K.decompress(bt)
        if not torch.equal(got.view(torch.int16 if got.element_size() == 2 else torch.int32),
                           want.view(torch.int16 if want.element_size() == 2 else torch.int32)):
            raise SystemExit(f"validation failed: decompress on path {p} differs from format.decode")
        y = K.sparse_matmul(x, bt).float()
        tol = 2 * torch.finfo(w.dtype).eps * ref.abs() + w.shape[1] * 2.0**-22 * (x.float().abs() @ w.float().abs().T)
        if not ((y - ref).abs() <= tol).all():
            raise SystemExit(f"validation failed: sparse_matmul on path {p} is off by {float((y - ref).abs().max())}")


def bench_shape(rows, cols, sparsity, dtype, threads_list, paths, repeats) -> list[dict]:
    w = sparse_matrix(rows, cols, sparsity, dtype)
    bt = encode(w)
    validate(w, bt, paths + ["torch"])
    dense_bytes, shape = w.numel() * w.element_size(), [rows, cols]
    out, src = torch.empty_like(w), w.clone()
    x = torch.randn(1, cols).to(dtype)
    results = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        row = dict(shape=shape, sparsity=sparsity, threads=threads)
        t_copy = median_time(lambda: out.copy_(src), repeats)
        results.append(dict(kernel="memcpy", path="torch", gbps=dense_bytes / t_copy / 1e9, speedup_vs_torch=None,
                            ms=t_copy * 1e3, **row))
        t_ref = median_time(lambda: decode(bt, out=out), max(3, repeats // 4))
        results.append(dict(kernel="decompress", path="torch", gbps=dense_bytes / t_ref / 1e9, speedup_vs_torch=1.0,
                            ms=t_ref * 1e3, **row))
        for p in paths:
            with_path(p)
            t = median_time(lambda: K.decompress(bt, out=out, threads=threads), repeats)
            results.append(dict(kernel="decompress", path=p, gbps=dense_bytes / t / 1e9, speedup_vs_torch=t_ref / t,
                                ms=t * 1e3, **row))
        t_lin = median_time(lambda: torch.nn.functional.linear(x, w), repeats)
        results.append(dict(kernel="matvec", path="torch", gbps=dense_bytes / t_lin / 1e9, speedup_vs_torch=1.0,
                            ms=t_lin * 1e3, **row))
        for p in paths:
            with_path(p)
            t = median_time(lambda: K.sparse_matmul(x, bt, threads=threads), repeats)
            results.append(dict(kernel="matvec", path=p, gbps=bt.nbytes / t / 1e9, speedup_vs_torch=t_lin / t,
                                ms=t * 1e3, **row))
    return results


def crossover(rows, cols, sparsity, dtype, threads_list, repeats) -> None:
    """Fused kernel vs (decompress into a reused buffer + dense linear), by rows of x."""
    w = sparse_matrix(rows, cols, sparsity, dtype)
    bt = encode(w)
    buf = torch.empty_like(w)
    path = K.kernel_path()
    print(f"\n{rows}x{cols} {dtype} sparsity {sparsity}, path {path}: ms per call")
    print("| threads | batch | fused | decompress + linear | fused wins |")
    print("|---|---|---|---|---|")
    for threads in threads_list:
        torch.set_num_threads(threads)
        for batch in (1, 2, 4, 6, 8, 12, 16, 24, 32):
            x = torch.randn(batch, cols).to(dtype)
            t_f = median_time(lambda: native.matvec(x, bt, path=path, threads=threads), repeats)
            t_d = median_time(lambda: torch.nn.functional.linear(x, K.decompress(bt, out=buf, threads=threads)), repeats)
            print(f"| {threads} | {batch} | {t_f * 1e3:.2f} | {t_d * 1e3:.2f} | {'yes' if t_f < t_d else 'no'} |")


def print_table(results: list[dict]) -> None:
    print("| kernel | path | shape | sparsity | threads | ms | GB/s | speedup vs torch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        sp = "" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.2f}x"
        shape = "x".join(map(str, r["shape"]))
        print(f"| {r['kernel']} | {r['path']} | {shape} | {r['sparsity']} | {r['threads']} | {r['ms']:.2f} | "
              f"{r['gbps']:.2f} | {sp} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"], help="ROWSxCOLS")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--paths", nargs="+", default=None, help="native paths (default: all this CPU runs)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="print one JSON object with a `results` list")
    ap.add_argument("--crossover", action="store_true", help="measure the batch size where fusing stops paying")
    a = ap.parse_args()

    dtype = DTYPES[a.dtype]
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes]
    if a.crossover:
        for rows, cols in shapes:
            crossover(rows, cols, a.sparsity, dtype, a.threads, a.repeats)
        return
    paths = a.paths or native.available_paths()
    results = []
    for rows, cols in shapes:
        results += bench_shape(rows, cols, a.sparsity, dtype, a.threads, paths, a.repeats)
    if a.json:
        print(json.dumps({"dtype": a.dtype, "torch": torch.__version__, "cpu_paths": native.available_paths(),
                          "results": results}))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
