"""Fast kernels for the bitmap format, with one public API that dispatches by device.

    decompress(bt, out=None, *, threads=None) -> dense [rows, cols]
    sparse_matmul(x, bt, bias=None, *, threads=None) -> x @ W.T (+ bias)
    dense_matmul(x, w, bias=None, *, threads=None) -> x @ w.T (+ bias) for a plain dense w
    linear_wide(x, w, bias=None) -> torch's linear, in fp32 on CPUs whose bf16/fp16 GEMM is slow
    kernel_path(device="cpu") -> "avx512" | "avx2" | "c" | "torch" | "triton"
    MATVEC_MAX_BATCH: largest number of rows of x for which sparse_matmul uses the fused kernel

CPU: the native extension (csrc/), picking the best path this CPU runs (AVX-512 VBMI2, AVX2, C);
`SPARSEFERRY_KERNEL=avx512|avx2|c|torch` forces one (read at every call). If the extension is
missing, the pure-torch reference (`sparseferry.format.decode`) is used, with a one-time notice.
CUDA: Triton (`triton_kernels.py`), or the torch reference if triton is not installed.
Every path is bit-exact to `format.decode` (decompress); the fused matmul accumulates in fp32.
Quantized matrices (`format.QuantBitmapTensor`, int8 / int4 values) go through the same API: every
path dequantizes while it decompresses (one pass, no dense intermediate), bit-exact to the
reference `quant.decode_quant`; the fused CPU matvec dequantizes inside its multiply loop (AVX-512;
other paths and fp32 values: into a scratch row first). AVX2 CPUs get their own fused loop
(csrc/matvec_avx2.c: one table shuffle and one FMA per 8 columns). For quantized values the fused
matvec on AVX2, and on AVX-512 with VNNI, quantizes x to int8 per 32 columns and multiplies in
integers (csrc/matvec_qx.c, matvec_qx512.c: the approach of llama.cpp's Q8_0 / Q4_0 kernels; lossy
in x, see `int8_activations`).
"""
from __future__ import annotations

import logging
import math
import os

import torch

from ..format import VALUE_DTYPES, BitmapTensor, QuantBitmapTensor, decode
from . import native
from .native import KernelError

__all__ = ["MATVEC_MAX_BATCH", "KernelError", "decompress", "dense_matmul", "int8_activations", "kernel_path",
           "linear_wide", "sparse_matmul"]

ENV_VAR = "SPARSEFERRY_KERNEL"
EXACT_QUANT_ENV = "SPARSEFERRY_EXACT_QUANT"
CPU_PATHS = ("avx512", "avx2", "c", "torch")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _slow_half_gemm(flags: set[str]) -> dict[torch.dtype, bool]:
    """Whether torch's CPU GEMM in bf16 / fp16 is slow here: without AVX512_BF16 / AMX (bf16) or
    AVX512_FP16 / AMX-FP16 (fp16) it converts inside its inner loop and runs several times slower
    than fp32 on the same matrices (measured: 2.5-6x on an AVX2 Zen 3, 32-256 rows). Unknown CPUs
    (no /proc/cpuinfo) keep torch's GEMM."""
    if not flags:
        return {torch.bfloat16: False, torch.float16: False}
    return {torch.bfloat16: not ({"avx512_bf16", "amx_bf16"} & flags),
            torch.float16: not ({"avx512_fp16", "amx_fp16"} & flags)}


SLOW_HALF_GEMM = _slow_half_gemm(_cpu_flags())

# Up to this many rows of x, the fused kernel beats decompress + matmul on CPU.
# Measured with `python benchmarks/kernels.py --crossover --shapes 4096x4096` (bf16, 50% sparse,
# AVX-512 path, 2-core AMD EPYC Zen 4): the fused kernel's cost grows with the batch (it re-runs
# the expand + multiply per group of 4 rows of x; ~0.08 / 0.09 / 0.14 / 0.24 ms per 256x4096 rows
# at batch 1 / 2 / 4 / 8, bf16 x), dense linear's barely does, and decompress + linear took
# ~18-25 ms vs fused 17 ms at batch 8, 21 ms at 12, 27 ms at 16 (1 thread); with fp32 x (no
# AVX512_BF16 dot) the fused kernel is ~1.6x slower per batch row, so 8 is where it wins for every x dtype.
# Where bf16 GEMM is slow (no AVX512_BF16: the matmul beyond then runs in fp32, `linear_wide`), the
# fused kernel wins up to ~48 rows (AVX2 Zen 3, 5632 x 2048 bf16 at 50%: 12.8 ms fused vs 18.4
# decompress + fp32 at 32 rows, 26.3 vs 20.7 at 64; torch's bf16 linear: 39.7 and 73.0 ms).
MATVEC_MAX_BATCH = 32 if SLOW_HALF_GEMM[torch.bfloat16] else 8
WIDE_CHUNK_BYTES = 4 << 20  # fp32 rows of W converted at a time by linear_wide (in runtime.allowance)

_log = logging.getLogger(__name__)
_noticed: set[str] = set()


def _notice_once(key: str, msg: str) -> None:
    if key not in _noticed:
        _noticed.add(key)
        _log.warning(msg)


def _triton_or_none():
    try:
        from . import triton_kernels
    except ImportError as e:
        _notice_once("triton", f"sparseferry: triton is not available ({e}); decompressing on the GPU with the torch reference")
        return None
    return triton_kernels


def kernel_path(device="cpu") -> str:
    """The path `decompress` takes for tensors on `device` right now.

    CPU: SPARSEFERRY_KERNEL if set (KernelError if it names an unknown path or one this CPU or
    build lacks), else the fastest native path, else "torch". CUDA: "triton" unless
    SPARSEFERRY_KERNEL=torch or triton is missing. Other devices: "torch".
    """
    dev = torch.device(device)
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced and forced not in CPU_PATHS:
        raise KernelError(f"{ENV_VAR}={forced!r}: expected one of {', '.join(CPU_PATHS)}")
    if dev.type == "cuda":
        return "torch" if forced == "torch" or _triton_or_none() is None else "triton"
    if dev.type != "cpu" or forced == "torch":
        return "torch"
    paths = native.available_paths()
    if forced:
        if forced not in paths:
            why = native.LOAD_ERROR or "this CPU lacks the instructions it needs"
            raise KernelError(f"{ENV_VAR}={forced}: that path cannot run here ({why}); available: {paths + ['torch']}")
        return forced
    if not paths:
        _notice_once("native", f"sparseferry: native kernels not available ({native.LOAD_ERROR}); using the torch reference")
        return "torch"
    return paths[0]


def _threads(threads: int | None) -> int:
    if threads is None:
        return torch.get_num_threads()
    if threads < 1:
        raise KernelError(f"threads={threads}: expected a positive number of threads")
    return int(threads)


def decompress(bt: BitmapTensor, out: torch.Tensor | None = None, *, threads: int | None = None) -> torch.Tensor:
    """Dense [rows, cols] of bt on bt's device, bit-exact to `format.decode(bt)`.

    out: optional preallocated contiguous [rows, cols] tensor of bt's dtype and device; it is
        filled and returned, nothing is allocated (reuse it to avoid page faults on every call).
    threads: CPU threads (default torch.get_num_threads()); the GIL is released while the kernel
        runs, so this can run in a background thread.
    Raises KernelError for a wrong `out`, FormatError if bt's row_offsets disagree with its bitmask
    (native path; the Triton path trusts them).
    """
    rows, cols = bt.shape
    if out is None:
        out = torch.empty(rows, cols, dtype=bt.dtype, device=bt.device)
    elif tuple(out.shape) != (rows, cols) or out.dtype != bt.dtype or out.device != bt.device or not out.is_contiguous():
        raise KernelError(
            f"decompress: out is {out.dtype} {list(out.shape)} on {out.device}"
            f"{'' if out.is_contiguous() else ' (not contiguous)'}, expected contiguous {bt.dtype} {[rows, cols]} on {bt.device}"
        )
    path = kernel_path(bt.device)
    if path == "torch":
        return decode(bt, out=out)
    if path == "triton":
        return _triton_or_none().decompress(bt, out)
    return native.decompress(bt, out, path=path, threads=_threads(threads))


def int8_activations(bt: BitmapTensor, path: str, x_dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether sparse_matmul's fused kernel quantizes x to int8 for bt (csrc/matvec_qx.c).

    Yes for int8 / int4 values times bf16 / fp16 x (activations already rounded to 8 or 11 bits: the
    int8 step per 32 columns, max|x| / 127, is of the same order) on a path that has the integer
    kernel (`native.int8_x_paths()`: AVX2, and AVX-512 where the CPU has VNNI), where integer dot
    products beat dequantizing every weight, unless SPARSEFERRY_EXACT_QUANT=1. fp32 x and the other
    paths stay exact (only the weights are rounded).
    """
    return (isinstance(bt, QuantBitmapTensor) and path in _INT8_X_PATHS and x_dtype in (torch.bfloat16, torch.float16)
            and os.environ.get(EXACT_QUANT_ENV, "").strip() not in ("1", "true", "yes"))


_INT8_X_PATHS = frozenset(native.int8_x_paths())


def sparse_matmul(x: torch.Tensor, bt: BitmapTensor, bias: torch.Tensor | None = None, *,
                  threads: int | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) for W = the matrix of bt [rows, cols]; x [..., cols] -> y [..., rows] in x's dtype.

    On CPU with a native path and at most MATVEC_MAX_BATCH rows of x: the fused kernel, reading W
    in its compressed form (fp32 accumulation, one rounding to x's dtype at the end). Otherwise
    decompress + torch.nn.functional.linear in the wider of x's and W's dtypes.
    """
    rows, cols = bt.shape
    if x.shape[-1:] != (cols,) or x.dtype not in VALUE_DTYPES or x.device != bt.device:
        raise KernelError(
            f"sparse_matmul: x is {x.dtype} {list(x.shape)} on {x.device}, expected [..., {cols}] bf16/fp16/fp32 on {bt.device}"
        )
    if bias is not None and (tuple(bias.shape) != (rows,) or bias.device != bt.device):
        raise KernelError(f"sparse_matmul: bias is {list(bias.shape)} on {bias.device}, expected [{rows}] on {bt.device}")
    lead = x.shape[:-1]
    batch = math.prod(lead)
    path = kernel_path(x.device)
    if path in native.PATHS and 0 < batch <= MATVEC_MAX_BATCH:
        y = native.matvec(x.reshape(batch, cols), bt, path=path, threads=_threads(threads),
                          int8_x=int8_activations(bt, path, x.dtype))  # fp32 [batch, rows]
        if bias is not None:
            y += bias.float()
        return y.to(x.dtype).reshape(*lead, rows)
    w = decompress(bt, threads=threads)
    dt = torch.promote_types(x.dtype, w.dtype)  # never round W (or x) to a narrower dtype
    return linear_wide(x.to(dt), w.to(dt), None if bias is None else bias.to(dt)).to(x.dtype)


def linear_wide(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch.nn.functional.linear(x, w, bias) for many rows of x; on a CPU whose bf16 / fp16 GEMM is
    slow (SLOW_HALF_GEMM), computed in fp32 instead: W converted WIDE_CHUNK_BYTES of rows at a time
    into one small reused buffer (no W-sized copy), one fp32 GEMM per chunk, the result rounded once
    to x's dtype. More accurate than the half-precision GEMM, never less."""
    if not (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == w.dtype and w.dim() == 2
            and w.dtype in (torch.bfloat16, torch.float16) and SLOW_HALF_GEMM[w.dtype] and type(w) in (torch.Tensor, torch.nn.Parameter)
            and not (x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad))):
        return torch.nn.functional.linear(x, w, bias)
    rows, cols = w.shape
    xf = x.reshape(-1, cols).float()
    out = torch.empty(xf.shape[0], rows, dtype=torch.float32)
    step = max(1, min(rows, WIDE_CHUNK_BYTES // max(4 * cols, 1)))
    buf = torch.empty(step, cols, dtype=torch.float32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        chunk = buf[: r1 - r0].copy_(w[r0:r1])
        out[:, r0:r1] = xf @ chunk.T
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], rows)


def dense_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                 threads: int | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) for a plain dense w [rows, cols], like torch.nn.functional.linear.

    On CPU with a native path, at most MATVEC_MAX_BATCH rows of x and a contiguous bf16/fp16/fp32 w
    of x's dtype: the native dense matvec (one pass over w, fp32 accumulation, one rounding to x's
    dtype), which reads w at the machine's memory bandwidth where torch's small-batch bf16 GEMM on
    CPUs without AVX512_BF16 does not. Anything else (and any tensor subclass, e.g. a placeholder
    of a streamed weight) goes to torch.nn.functional.linear unchanged.
    """
    lead = x.shape[:-1]
    batch = math.prod(lead)
    native_ok = (
        type(w) in (torch.Tensor, torch.nn.Parameter) and w.dim() == 2 and w.is_contiguous()
        and w.device.type == "cpu" and x.device.type == "cpu" and x.shape[-1:] == w.shape[1:]
        and w.dtype == x.dtype and x.dtype in VALUE_DTYPES and 0 < batch <= MATVEC_MAX_BATCH
        and not (x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad))
        and (bias is None or (bias.device.type == "cpu" and tuple(bias.shape) == (w.shape[0],)))
    )
    path = kernel_path("cpu") if native_ok else None
    if path in native.PATHS:
        y = native.matvec_dense(x.reshape(batch, x.shape[-1]), w, path=path, threads=_threads(threads))
        if bias is not None:
            y += bias.float()
        return y.to(x.dtype).reshape(*lead, w.shape[0])
    if path == "torch":  # no native kernel (or SPARSEFERRY_KERNEL=torch): torch's own linear
        return torch.nn.functional.linear(x, w, bias)
    return linear_wide(x, w, bias)
