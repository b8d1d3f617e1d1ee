"""Loader and checked wrappers of the native CPU kernels (the `sparseferry._native` extension, csrc/).

The extension takes raw addresses and sizes; everything that could make it read or write out of
bounds is checked here first (dtypes, shapes, contiguity, device), and the kernels themselves check
each row's `row_offsets` span against its bitmask before reading values. Inputs may be views into
a larger buffer at any offset that respects their element size.
"""
from __future__ import annotations

import torch

from ..errors import SparseferryError
from ..format import (
    SCALE_DTYPE,
    VALUE_DTYPES,
    BitmapTensor,
    FormatError,
    QuantBitmapTensor,
)

try:
    from .. import _native
except ImportError as e:  # not built (no compiler at install time) or not loadable here
    _native = None
    LOAD_ERROR: str | None = f"{type(e).__name__}: {e}"
else:
    LOAD_ERROR = None

PATHS = {"c": 0, "avx2": 1, "avx512": 2}  # path name -> code passed to the extension
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class KernelError(SparseferryError):
    """A kernel was given inputs it cannot run on, or asked for a path this machine lacks."""


def available_paths() -> list[str]:
    """Native paths this CPU can run, fastest first ([] if the extension is not loaded)."""
    if _native is None:
        return []
    bits = _native.supported_paths()
    return [p for p in ("avx512", "avx2", "c") if bits & (1 << PATHS[p])]


def int8_x_paths() -> list[str]:
    """Native paths whose CPU here runs the fused matvec with int8 activations (csrc/matvec_qx.c:
    AVX2; AVX-512 with VNNI, csrc/matvec_qx512.c)."""
    if _native is None:
        return []
    bits = _native.qx_paths()
    return [p for p in ("avx512", "avx2") if bits & (1 << PATHS[p])]


def _check_part(t: torch.Tensor, name: str, dtype, shape: tuple[int, ...]) -> None:
    if t.device.type != "cpu":
        raise KernelError(f"bitmap part {name}: on {t.device}, the native kernels need CPU tensors")
    if dtype is not None and t.dtype != dtype:
        raise KernelError(f"bitmap part {name}: dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != shape:
        raise KernelError(f"bitmap part {name}: shape {list(t.shape)}, expected {list(shape)}")
    if not t.is_contiguous():
        raise KernelError(f"bitmap part {name}: not contiguous (strides {t.stride()})")


def check_bitmap(bt: BitmapTensor) -> None:
    """Raise KernelError unless bt's parts are CPU, contiguous, of the dtypes and shapes of FORMAT.md."""
    rows, cols = bt.shape
    if isinstance(bt, QuantBitmapTensor):
        _check_quant(bt)
        return
    if bt.values.dtype not in VALUE_DTYPES:
        raise KernelError(f"bitmap values: dtype {bt.values.dtype}, expected one of bf16, fp16, fp32")
    _check_part(bt.values, "compressed", None, (bt.values.numel(),))
    _check_part(bt.bitmask, "bitmask", torch.uint8, (rows, (cols + 7) // 8))
    _check_part(bt.row_offsets, "row_offsets", torch.int64, (rows,))


def _check_quant(qbt: QuantBitmapTensor) -> None:
    rows, cols = qbt.shape
    if qbt.out_dtype not in VALUE_DTYPES:
        raise KernelError(f"quantized bitmap: out dtype {qbt.out_dtype}, expected one of bf16, fp16, fp32")
    int4 = qbt.value_format == "int4"
    ncodes = (qbt.nnz + 1) // 2 if int4 else qbt.nnz
    _check_part(qbt.values, "codes", torch.uint8 if int4 else torch.int8, (ncodes,))
    ng = qbt.scales.numel()
    _check_part(qbt.scales, "scales", SCALE_DTYPE, (ng,))
    if int4:
        _check_part(qbt.zeros, "zeros", torch.uint8, (ng,))
    elif qbt.zeros is not None:
        raise KernelError("quantized bitmap: int8 values take no zero points")
    _check_part(qbt.group_offsets, "group_offsets", torch.int64, (rows,))
    _check_part(qbt.bitmask, "bitmask", torch.uint8, (rows, (cols + 7) // 8))
    _check_part(qbt.row_offsets, "row_offsets", torch.int64, (rows,))


def _quant_args(qbt: QuantBitmapTensor) -> tuple:
    """(qbits, out dtype code, rows, cols, nnz, codes, scales, zeros, group_offsets, G, nscales) for the extension."""
    rows, cols = qbt.shape
    g = qbt.group_size if qbt.group_size > 0 else max(cols, 1)
    return (qbt.qbits, _DTYPE_CODES[qbt.out_dtype], rows, cols, qbt.nnz, qbt.values.data_ptr(), qbt.scales.data_ptr(),
            qbt.zeros.data_ptr() if qbt.zeros is not None else 0, qbt.group_offsets.data_ptr(), g, qbt.scales.numel())


def _raise_bad_row(bt: BitmapTensor, row: int) -> None:
    rows, cols = bt.shape
    groups = ", or its group_offsets point outside scales" if isinstance(bt, QuantBitmapTensor) else ""
    raise FormatError(
        f"bitmap matrix [{rows}, {cols}] (nnz {bt.nnz}): row {row} is inconsistent: its row_offsets span "
        f"does not match its set bits (or row_offsets[0] != 0, or the last row does not end at nnz{groups})"
    )


def decompress(bt: BitmapTensor, out: torch.Tensor, *, path: str, threads: int) -> torch.Tensor:
    """Fill `out` ([rows, cols], bt's dtype, CPU, contiguous: checked by the caller) with the decode of bt."""
    check_bitmap(bt)
    rows, cols = bt.shape
    if isinstance(bt, QuantBitmapTensor):  # dequantized on the way (csrc/dequant.c)
        bad = _native.decompress_q(PATHS[path], *_quant_args(bt), bt.bitmask.data_ptr(), bt.row_offsets.data_ptr(),
                                   out.data_ptr(), threads) if rows and cols else -1
        if bad >= 0:
            _raise_bad_row(bt, bad)
        return out
    if rows and cols:
        bad = _native.decompress(
            PATHS[path], bt.values.element_size(), rows, cols, bt.values.data_ptr(), bt.nnz,
            bt.bitmask.data_ptr(), bt.row_offsets.data_ptr(), out.data_ptr(), threads,
        )
        if bad >= 0:
            _raise_bad_row(bt, bad)
    return out


def matvec(x: torch.Tensor, bt: BitmapTensor, *, path: str, threads: int, int8_x: bool = False) -> torch.Tensor:
    """y = x @ W.T for x [batch, cols] (any float dtype, CPU): fp32 [batch, rows], accumulated in fp32.

    int8_x (quantized bt only): x quantized to int8 per 32 columns, integer dot products with the
    codes (csrc/matvec_qx.c; reference `reference.sparse_matmul_int8x_reference`); where that kernel
    does not apply (a path not in int8_x_paths(), a zero point above 15) the exact kernel runs instead.
    """
    return matvec_prepared(prepare_matvec(bt, path=path, int8_x=int8_x), x, threads=threads)


def prepare_matvec(bt: BitmapTensor, *, path: str, int8_x: bool = False) -> tuple:
    """bt checked (`check_bitmap`) and its arguments for the extension, for `matvec_prepared`: a caller
    that multiplies by the same matrix many times checks it once. The tuple holds raw addresses:
    it is valid only while bt's tensors live (the caller keeps bt)."""
    check_bitmap(bt)
    rows, cols = bt.shape
    if isinstance(bt, QuantBitmapTensor):  # each row dequantized, then multiplied
        head = (PATHS[path], *_quant_args(bt), bt.bitmask.data_ptr(), bt.row_offsets.data_ptr())
        return (2 if int8_x else 1, rows, cols, head, bt)
    head = (PATHS[path], _DTYPE_CODES[bt.dtype], rows, cols, bt.values.data_ptr(), bt.nnz, bt.bitmask.data_ptr(),
            bt.row_offsets.data_ptr())
    return (0, rows, cols, head, bt)


def matvec_prepared(prep: tuple, x: torch.Tensor, *, threads: int, bf16_out: bool = False,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """`matvec` of the matrix `prepare_matvec` checked: x [batch, cols] -> fp32 [batch, rows].

    bf16_out: return y (+ bias, a bf16 [rows]) rounded to bf16 instead, as `(y + bias.float()).to(bf16)`,
    rounded by the same call (the decode step's products)."""
    kind, rows, cols, head, bt = prep
    if x.dim() != 2 or x.shape[1] != cols or x.device.type != "cpu":
        raise KernelError(f"matvec: x is {list(x.shape)} on {x.device}, expected [batch, {cols}] on the CPU")
    if bias is not None and (not bf16_out or bias.dtype != torch.bfloat16 or bias.device.type != "cpu"
                             or not bias.is_contiguous() or tuple(bias.shape) != (rows,)):
        raise KernelError(f"matvec: bias {bias.dtype} {list(bias.shape)}, expected contiguous bf16 [{rows}] (bf16_out)")
    # [batch, cols] contiguous, bf16 or fp32: bf16 x meets bf16 W in one dot instruction (AVX512_BF16)
    x = (x if x.dtype == torch.bfloat16 else x.to(torch.float32)).contiguous()
    batch = x.shape[0]
    y = torch.empty(batch, rows, dtype=torch.float32)
    out = torch.empty(batch, rows, dtype=torch.bfloat16) if bf16_out else y
    if not (batch and rows):
        return out.zero_()
    args = (*head, x.data_ptr(), _DTYPE_CODES[x.dtype], batch, y.data_ptr(), threads)
    if bf16_out:
        args += (out.data_ptr(), 0 if bias is None else bias.data_ptr())
    if kind == 0:
        bad = _native.matvec(*args)
    else:
        bad = _native.matvec_qx(*args) if kind == 2 else -3
        if bad == -3:
            bad = _native.matvec_q(*args)
    if bad >= 0:
        _raise_bad_row(bt, bad)
    return out


def matvec_dense(x: torch.Tensor, w: torch.Tensor, *, path: str, threads: int) -> torch.Tensor:
    """y = x @ w.T for x [batch, cols] and a dense w [rows, cols] (fp32/bf16/fp16, CPU): fp32 [batch, rows]."""
    if w.dim() != 2 or w.dtype not in _DTYPE_CODES or w.device.type != "cpu" or not w.is_contiguous():
        raise KernelError(f"matvec_dense: w is {w.dtype} {list(w.shape)} on {w.device}, expected a contiguous 2-D CPU matrix")
    rows, cols = w.shape
    x = (x if x.dtype == torch.bfloat16 else x.to(torch.float32)).contiguous()
    if x.dim() != 2 or x.shape[1] != cols or x.device.type != "cpu":
        raise KernelError(f"matvec_dense: x is {list(x.shape)} on {x.device}, expected [batch, {cols}] on the CPU")
    batch = x.shape[0]
    y = torch.empty(batch, rows, dtype=torch.float32)
    if batch and rows and cols:
        _native.matvec_dense(PATHS[path], _DTYPE_CODES[w.dtype], rows, cols, w.data_ptr(), x.data_ptr(),
                             _DTYPE_CODES[x.dtype], batch, y.data_ptr(), threads)
    elif batch and rows:
        y.zero_()
    return y


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm (LlamaRMSNorm's arithmetic: csrc/norm.c) of bf16 x [..., h] with a bf16
    weight [h], on the CPU, in one call; the same shape and dtype as x."""
    h = x.shape[-1] if x.dim() else 0
    if (x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.device.type != "cpu"
            or weight.device.type != "cpu" or weight.dim() != 1 or weight.shape[0] != h or h < 1
            or not weight.is_contiguous()):
        raise KernelError(f"rms_norm_bf16: x {x.dtype} {list(x.shape)} on {x.device}, weight {weight.dtype} "
                          f"{list(weight.shape)} on {weight.device}: expected bf16 CPU tensors, weight [h] contiguous")
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        _native.rmsnorm_bf16(x.data_ptr(), weight.data_ptr(), x.numel() // h, h, float(eps), out.data_ptr())
    return out


# The pieces of a decode step between the matrix products (csrc/decode.c; runtime/decode_layer.py).

def _bf16_cpu(name: str, t: torch.Tensor, dim: int) -> None:
    if t.dtype != torch.bfloat16 or t.device.type != "cpu" or t.dim() != dim:
        raise KernelError(f"{name}: {t.dtype} {list(t.shape)} on {t.device}, expected a {dim}-D bf16 CPU tensor")


def rope_bf16(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding (`x * cos + rotate_half(x) * sin`, bit-exact) of x [b, t, heads, d]
    in place; cos, sin [b or 1, t, d]. Returns x."""
    _bf16_cpu("rope x", x, 4)
    b, t, heads, d = x.shape
    for name, c in (("cos", cos), ("sin", sin)):
        _bf16_cpu(f"rope {name}", c, 3)
        if c.shape[0] not in (1, b) or tuple(c.shape[1:]) != (t, d) or not c.is_contiguous():
            raise KernelError(f"rope {name}: {list(c.shape)}, expected contiguous [{b} or 1, {t}, {d}]")
    if not x.is_contiguous() or d % 2 or d > 512:
        raise KernelError(f"rope x: {list(x.shape)}, expected contiguous with an even head size of at most 512")
    if x.numel():
        _native.rope_bf16(x.data_ptr(), b, t, heads, d, cos.data_ptr(), sin.data_ptr(), cos.shape[0])
    return x


def _same_bf16(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    for t in (a, b):
        if t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous():
            raise KernelError(f"{name}: {t.dtype} {list(t.shape)} on {t.device}, expected contiguous bf16 CPU tensors")
    if a.shape != b.shape:
        raise KernelError(f"{name}: shapes {list(a.shape)} and {list(b.shape)} differ")


def silu_mul_bf16(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u with transformers' bf16 roundings (csrc/decode.c); a new tensor."""
    _same_bf16("silu_mul", g, u)
    out = torch.empty_like(g)
    _native.silu_mul_bf16(g.data_ptr(), u.data_ptr(), g.numel(), out.data_ptr())
    return out


def add_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b in bf16 (bit-exact to torch's); a new tensor."""
    _same_bf16("add", a, b)
    out = torch.empty_like(a)
    _native.add_bf16(a.data_ptr(), b.data_ptr(), a.numel(), out.data_ptr())
    return out


def round_bf16(y: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 y [batch, rows] (+ bf16 bias [rows]) rounded to bf16, as `(y + bias.float()).to(bf16)`."""
    if y.dtype != torch.float32 or y.device.type != "cpu" or y.dim() != 2 or not y.is_contiguous():
        raise KernelError(f"round_bf16: y {y.dtype} {list(y.shape)}, expected a contiguous 2-D fp32 CPU tensor")
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.device.type != "cpu" or not bias.is_contiguous()
                             or tuple(bias.shape) != (y.shape[1],)):
        raise KernelError(f"round_bf16: bias {bias.dtype} {list(bias.shape)}, expected contiguous bf16 [{y.shape[1]}]")
    out = torch.empty(y.shape, dtype=torch.bfloat16)
    _native.round_bf16(y.data_ptr(), y.shape[0], y.shape[1], 0 if bias is None else bias.data_ptr(), out.data_ptr())
    return out
