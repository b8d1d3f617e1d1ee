"""The fast kernels agree with the pure-torch references, on every dispatch path this machine runs.

decompress == format.decode bit for bit (NaN payloads, Inf, subnormals included), for awkward
shapes around the vector widths (32/64 columns) and the column block (BLOCK_COLS), at sparsities 0,
0.5, 0.9 and 1, in bf16/fp16/fp32; and sparse_matmul == x.float() @ decode(W).float().T within the
error bound of fp32 accumulation. The Triton kernel is checked the same way in Triton's CPU
interpreter, in a subprocess (TRITON_INTERPRET must be set before triton is imported).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseferry.kernels as K
from sparseferry.format import BLOCK_COLS, BitmapTensor, FormatError, _unpack, decode, encode
from sparseferry.kernels import native
from sparseferry.kernels.reference import quantize_activations, sparse_matmul_int8x_reference, sparse_matmul_reference
from sparseferry.quant import dequantize_values, pack_int4, quantize

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ROWS = [1, 7, 17, 64, 65]
COLS = [1, 7, 17, 63, 64, 65, BLOCK_COLS - 1, BLOCK_COLS + 1]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]
CPU_PATHS = ["avx512", "avx2", "c", "torch"]
NATIVE_PATHS = ["avx512", "avx2", "c"]


def _skip_unless_runs(path: str) -> None:
    if path != "torch" and path not in native.available_paths():
        why = native.LOAD_ERROR or f"this CPU lacks the {path} instructions"
        pytest.skip(f"kernel path {path} cannot run here: {why}")


@pytest.fixture(params=CPU_PATHS)
def path(request, monkeypatch):
    """Force one CPU dispatch path through SPARSEFERRY_KERNEL, as a user would."""
    _skip_unless_runs(request.param)
    monkeypatch.setenv(K.ENV_VAR, request.param)
    assert K.kernel_path("cpu") == request.param
    return request.param


@pytest.fixture(params=NATIVE_PATHS)
def native_path(request):
    _skip_unless_runs(request.param)
    return request.param


def sparse_matrix(rows: int, cols: int, sparsity: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random W [rows, cols] with exactly round(sparsity * cols) zeros per row, no accidental zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w[w == 0] = 1.0
    nzero = round(sparsity * cols)
    drop = torch.rand(rows, cols, generator=g).argsort(dim=1)[:, :nzero]
    return w.scatter(1, drop, torch.zeros_like(w))


@functools.lru_cache(maxsize=None)
def encoded(rows: int, cols: int, sparsity: float, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, BitmapTensor]:
    """(W, encode(W)), built once per test session (shared by every path's test; never mutated)."""
    w = sparse_matrix(rows, cols, sparsity, dtype, seed)
    return w, encode(w)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor, for exact comparison (NaN == NaN when bits match)."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bit_exact(got: torch.Tensor, bt: BitmapTensor, want: torch.Tensor | None = None) -> None:
    """got == format.decode(bt) bit for bit (`want`: that decode, when the caller has it already)."""
    want = decode(bt) if want is None else want
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(bits(got), bits(want))


# ------------------------------------------------------------------------------------------------
# decompress


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decompress_is_bit_exact_over_awkward_shapes_and_sparsities(path, dtype):
    for rows in ROWS:
        for cols in COLS:
            for sparsity in SPARSITIES:
                w, bt = encoded(rows, cols, sparsity, dtype)
                assert_bit_exact(K.decompress(bt, threads=2), bt, want=w)  # W has no -0.0: decode(bt) == W


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decompress_keeps_nan_inf_and_subnormals_bit_exact(path, dtype):
    w = sparse_matrix(5, 2 * BLOCK_COLS + 3, 0.5, dtype)
    info = torch.finfo(dtype)
    nan_payload = {2: 0x7FC1 if dtype == torch.bfloat16 else 0x7E01, 4: 0x7FC00123}[w.element_size()]
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), info.tiny / 4, -info.tiny / 2], dtype=dtype)
    payload = torch.tensor([nan_payload], dtype=bits(w).dtype).view(dtype)
    for r in range(5):
        w[r, r * 97 : r * 97 + 5] = specials
        w[r, -1] = payload[0]
    bt = encode(w)
    got = K.decompress(bt)
    assert_bit_exact(got, bt)
    assert torch.isnan(got).sum() == 2 * 5 and torch.isinf(got).sum() == 2 * 5


def test_decompress_fills_and_returns_the_given_out(path):
    bt = encode(sparse_matrix(33, 1030, 0.5, torch.bfloat16))
    out = torch.full((33, 1030), float("nan"), dtype=torch.bfloat16)  # stale contents must not survive
    ptr = out.data_ptr()
    for _ in range(2):
        got = K.decompress(bt, out=out)
        assert got is out and out.data_ptr() == ptr
        assert_bit_exact(out, bt)


def test_decompress_rejects_an_out_of_the_wrong_shape_dtype_or_layout():
    bt = encode(sparse_matrix(4, 16, 0.5, torch.float16))
    for bad in (torch.empty(4, 15, dtype=torch.float16), torch.empty(4, 16, dtype=torch.float32),
                torch.empty(16, 4, dtype=torch.float16).T):
        with pytest.raises(K.KernelError, match=r"out is"):
            K.decompress(bt, out=bad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decompress_reads_views_at_odd_offsets_in_one_buffer(path, dtype):
    """The runtime reads a layer into one uint8 buffer and takes typed views: no alignment beyond the element's."""
    bt = encode(sparse_matrix(9, 130, 0.5, dtype))
    es = bt.values.element_size()
    buf = torch.zeros(64 + 8 * 9 + 3 + bt.bitmask.numel() + es * (bt.nnz + 1) + es * 9 * 130 + 64, dtype=torch.uint8)
    pos = 8  # row_offsets: 8 bytes past a 64-byte boundary

    def place(t: torch.Tensor, align: int) -> torch.Tensor:
        nonlocal pos
        pos += (-pos) % align
        raw = buf[pos : pos + t.numel() * t.element_size()]
        pos += raw.numel()
        view = raw.view(t.dtype).view(t.shape)
        view.copy_(t)
        return view

    row_offsets = place(bt.row_offsets, 8)
    pos += 3  # bitmask at an odd address
    bitmask = place(bt.bitmask, 1)
    pos += es  # values one element past wherever that leaves them
    values = place(bt.values, es)
    out = place(torch.zeros(9, 130, dtype=dtype), es)
    view_bt = BitmapTensor(bt.shape, values, bitmask, row_offsets, bt.block_offsets)
    assert values.data_ptr() % 64 != 0 and bitmask.data_ptr() % 2 == 1
    assert K.decompress(view_bt, out=out) is out
    assert_bit_exact(out, bt)


def test_decompress_is_the_same_on_one_and_two_threads(native_path, monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, native_path)
    bt = encode(sparse_matrix(512, 700, 0.7, torch.float32))  # > 256 KiB per thread: really splits rows
    assert_bit_exact(K.decompress(bt, threads=1), bt)
    assert_bit_exact(K.decompress(bt, threads=2), bt)


def test_decompress_runs_concurrently_from_threads(native_path, monkeypatch):
    """The runtime decompresses in a background thread (GIL released) while the main thread computes."""
    monkeypatch.setenv(K.ENV_VAR, native_path)
    mats = [encode(sparse_matrix(200, 1000, 0.5, torch.bfloat16, seed=s)) for s in range(4)]
    results = [None] * 4

    def work(i):
        results[i] = K.decompress(mats[i], threads=1)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for bt, got in zip(mats, results):
        assert_bit_exact(got, bt)


@pytest.mark.parametrize("corrupt", ["count", "first", "past_end", "truncated_values"])
def test_native_kernels_reject_row_offsets_that_disagree_with_the_bitmask(native_path, monkeypatch, corrupt):
    """A corrupt matrix raises FormatError naming the row; it never reads outside `values`."""
    monkeypatch.setenv(K.ENV_VAR, native_path)
    bt = encode(sparse_matrix(6, 100, 0.5, torch.bfloat16))
    ro, values, row = bt.row_offsets.clone(), bt.values, 3
    if corrupt == "count":
        ro[3] += 1
        row = 2  # row 2 now spans one value too many: the first inconsistent row found
    elif corrupt == "first":
        ro[0] = 1
        row = 0
    elif corrupt == "past_end":
        ro[5] = bt.nnz + 1000
        row = 4
    else:
        values = values[:-1]
        row = 5
    bad = BitmapTensor(bt.shape, values, bt.bitmask, ro, bt.block_offsets)
    with pytest.raises(FormatError, match=rf"row {row}\b|row \d"):
        K.decompress(bad)
    with pytest.raises(FormatError, match=r"inconsistent"):
        K.sparse_matmul(torch.ones(1, 100, dtype=torch.bfloat16), bad)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 300),
    sparsity=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_decompress_property_matches_reference_on_the_best_path(rows, cols, sparsity, dtype, seed):
    bt = encode(sparse_matrix(rows, cols, sparsity, dtype, seed))
    assert_bit_exact(K.decompress(bt), bt)


# ------------------------------------------------------------------------------------------------
# sparse_matmul


def fp32_error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|fp32 dot - exact| <= cols * u * sum_j |x_j w_j| (u = 2**-24), for ours and for the reference: twice that."""
    return 2 * x.shape[-1] * 2.0**-24 * (x.float().abs() @ w.float().abs().T) + 1e-30


@pytest.mark.parametrize("wdtype", DTYPES, ids=str)
@pytest.mark.parametrize("xdtype", DTYPES, ids=str)
def test_fused_matvec_matches_fp32_reference_within_accumulation_error(native_path, wdtype, xdtype):
    """The fused kernel itself (every batch size, also past MATVEC_MAX_BATCH) in fp32 before rounding."""
    for rows, cols in [(1, 1), (7, 17), (17, 63), (65, 64), (3, BLOCK_COLS + 1), (9, 2 * BLOCK_COLS + 33)]:
        for sparsity in SPARSITIES:
            w, bt = encoded(rows, cols, sparsity, wdtype)
            for batch in (1, 3, 17):
                x = torch.randn(batch, cols).to(xdtype)
                got = native.matvec(x, bt, path=native_path, threads=2)
                want = x.float() @ w.float().T
                assert got.dtype == torch.float32 and got.shape == (batch, rows)
                assert ((got - want).abs() <= fp32_error_bound(x, w)).all(), (rows, cols, sparsity, batch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_sparse_matmul_matches_reference_on_every_path(path, dtype, batch):
    """Public API: fused kernel up to MATVEC_MAX_BATCH rows, decompress + linear beyond; result in x's dtype."""
    w, bt = encoded(65, BLOCK_COLS + 1, 0.5, dtype)
    x = torch.randn(batch, BLOCK_COLS + 1).to(dtype)
    bias = torch.randn(65).to(dtype)
    got = K.sparse_matmul(x, bt, bias)
    want = x.float() @ w.float().T + bias.float()
    assert got.dtype == dtype and got.shape == (batch, 65)
    # the fp32 bound, plus one rounding of the result to x's dtype (and of bf16/fp16 linear's own)
    tol = fp32_error_bound(x, w) + 2 * torch.finfo(dtype).eps * want.abs()
    assert ((got.float() - want).abs() <= tol).all()
    torch.testing.assert_close(got, sparse_matmul_reference(x, bt, bias), atol=float(tol.max()), rtol=0)


def test_sparse_matmul_keeps_leading_dimensions_and_mixed_dtypes(path):
    w = sparse_matrix(10, 40, 0.5, torch.float32)
    bt = encode(w)
    x = torch.randn(2, 3, 40, dtype=torch.bfloat16)
    got = K.sparse_matmul(x, bt)
    assert got.shape == (2, 3, 10) and got.dtype == torch.bfloat16
    want = (x.float() @ w.T).to(torch.bfloat16)  # W is used in fp32, not rounded to bf16
    torch.testing.assert_close(got, want, atol=1e-2, rtol=2 * torch.finfo(torch.bfloat16).eps)


def test_sparse_matmul_rejects_mismatched_inputs():
    bt = encode(sparse_matrix(4, 16, 0.5, torch.float32))
    with pytest.raises(K.KernelError, match=r"\[\.\.\., 16\]"):
        K.sparse_matmul(torch.ones(1, 15), bt)
    with pytest.raises(K.KernelError, match=r"bias"):
        K.sparse_matmul(torch.ones(1, 16), bt, torch.ones(5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_matvec_matches_fp32_reference_within_accumulation_error(native_path, dtype):
    """The dense kernel (output head, dense weights) over shapes with partial 16-column blocks, every batch."""
    for rows, cols in [(1, 1), (7, 17), (17, 63), (65, 64), (3, BLOCK_COLS + 1), (9, 2 * BLOCK_COLS + 33)]:
        w = torch.randn(rows, cols).to(dtype)
        for xdtype in (torch.bfloat16, torch.float32):
            for batch in (1, 3, 5, 9):
                x = torch.randn(batch, cols).to(xdtype)
                got = native.matvec_dense(x, w, path=native_path, threads=2)
                want = x.float() @ w.float().T
                assert got.dtype == torch.float32 and got.shape == (batch, rows)
                assert ((got - want).abs() <= fp32_error_bound(x, w)).all(), (rows, cols, xdtype, batch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_matmul_is_linear_with_one_rounding_and_falls_back_beyond_its_cases(path, dtype):
    w, bias = torch.randn(33, 70).to(dtype), torch.randn(33).to(dtype)
    for lead in [(1,), (2, 2), (K.MATVEC_MAX_BATCH,)]:  # also a strided slice of x, as transformers hands the head
        x = torch.randn(*lead[:-1], lead[-1] + 1, 70).to(dtype)[..., 1:, :]
        got = K.dense_matmul(x, w, bias)
        if path == "torch":  # no native kernel: torch's linear, whatever its own rounding
            assert torch.equal(got, torch.nn.functional.linear(x, w, bias))
            continue
        want = x.float() @ w.float().T + bias.float()
        tol = fp32_error_bound(x.reshape(-1, 70), w).reshape(want.shape) + 2 * torch.finfo(dtype).eps * want.abs()
        assert got.dtype == dtype and got.shape == want.shape and ((got.float() - want).abs() <= tol).all()
    x = torch.randn(K.MATVEC_MAX_BATCH + 1, 70).to(dtype)  # beyond the fused kernel's batch: linear_wide
    assert torch.equal(K.dense_matmul(x, w, bias), K.linear_wide(x, w, bias))
    # a transposed (non-contiguous) weight: torch's own linear, same numbers
    wt = torch.randn(70, 33).to(dtype).T
    x = torch.randn(1, 70).to(dtype)
    torch.testing.assert_close(K.dense_matmul(x, wt), torch.nn.functional.linear(x, wt))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_wide_is_torch_linear_or_an_fp32_one_where_half_gemm_is_slow(dtype, monkeypatch):
    """Where torch's bf16 / fp16 GEMM is slow, linear_wide computes in fp32 (W converted a few rows at a
    time: chunks of 5 rows here, so the last one is partial) and rounds once; elsewhere it is torch's."""
    w, bias = torch.randn(33, 70).to(dtype), torch.randn(33).to(dtype)
    x = torch.randn(2, 20, 70).to(dtype)
    monkeypatch.setattr(K, "WIDE_CHUNK_BYTES", 5 * 70 * 4)
    for slow in (False, True):
        monkeypatch.setitem(K.SLOW_HALF_GEMM, dtype, slow)
        got = K.linear_wide(x, w, bias)
        if not slow or dtype == torch.float32:
            assert torch.equal(got, torch.nn.functional.linear(x, w, bias))
            continue
        want = x.float() @ w.float().T + bias.float()
        tol = fp32_error_bound(x.reshape(-1, 70), w).reshape(want.shape) + torch.finfo(dtype).eps * want.abs()
        assert got.dtype == dtype and got.shape == (2, 20, 33) and ((got.float() - want).abs() <= tol).all()


def test_fused_batch_limit_is_larger_where_half_gemm_is_slow():
    assert K.MATVEC_MAX_BATCH == (32 if K.SLOW_HALF_GEMM[torch.bfloat16] else 8)
    assert K._slow_half_gemm({"avx2", "avx512_bf16"}) == {torch.bfloat16: False, torch.float16: True}
    assert K._slow_half_gemm({"avx2", "fma"}) == {torch.bfloat16: True, torch.float16: True}
    assert K._slow_half_gemm(set()) == {torch.bfloat16: False, torch.float16: False}  # unknown: torch's own


def test_dense_matmul_never_reads_a_tensor_subclass_such_as_a_streamed_placeholder():
    class Opaque(torch.Tensor):
        pass

    w = torch.randn(4, 8).as_subclass(Opaque)
    calls = []

    def linear(x, w, b=None):
        calls.append(type(w))
        return torch.zeros(1, 4)

    import unittest.mock

    with unittest.mock.patch.object(torch.nn.functional, "linear", linear):
        K.dense_matmul(torch.ones(1, 8), w)
    assert calls == [Opaque]


def test_matvec_max_batch_is_a_small_positive_constant():
    assert isinstance(K.MATVEC_MAX_BATCH, int) and 1 <= K.MATVEC_MAX_BATCH <= 64


# ------------------------------------------------------------------------------------------------
# dispatch


def test_kernel_path_defaults_to_the_fastest_native_path(monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    expected = (native.available_paths() or ["torch"])[0]
    assert K.kernel_path() == expected == K.kernel_path("cpu")
    assert K.kernel_path("meta") == "torch"


def test_kernel_path_rejects_unknown_or_unavailable_forced_paths(monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "sse9")
    with pytest.raises(K.KernelError, match=r"SPARSEFERRY_KERNEL='sse9'"):
        K.kernel_path()
    monkeypatch.setattr(native, "available_paths", lambda: ["c"])
    monkeypatch.setenv(K.ENV_VAR, "avx512")
    with pytest.raises(K.KernelError, match=r"avx512.*cannot run here"):
        K.kernel_path()


def test_without_the_extension_the_torch_reference_is_used_with_one_notice(monkeypatch, caplog):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    monkeypatch.setattr(native, "_native", None)
    monkeypatch.setattr(native, "LOAD_ERROR", "ImportError: no module named sparseferry._native")
    monkeypatch.setattr(K, "_noticed", set())
    bt = encode(sparse_matrix(3, 20, 0.5, torch.bfloat16))
    with caplog.at_level(logging.WARNING, logger="sparseferry.kernels"):
        assert K.kernel_path() == "torch"
        assert_bit_exact(K.decompress(bt), bt)
        K.sparse_matmul(torch.ones(1, 20, dtype=torch.bfloat16), bt)
    notices = [r for r in caplog.records if "native kernels not available" in r.getMessage()]
    assert len(notices) == 1 and "no module named" in notices[0].getMessage()


# ------------------------------------------------------------------------------------------------
# quantized values (int8 / int4): dequantized while decompressing, bit-exact to quant.decode_quant

# per row, groups ending inside vector steps (7, 5: also int4 groups starting mid-byte), whole 32-lane steps
QUANT = [("int8", 0), ("int8", 7), ("int4", 5), ("int4", 32)]


@functools.lru_cache(maxsize=None)
def quantized(rows: int, cols: int, sparsity: float, dtype: torch.dtype, value_format: str, group_size: int):
    """(dense reference decode, QuantBitmapTensor), once per session (never mutated)."""
    q = quantize(sparse_matrix(rows, cols, sparsity, dtype, seed=rows * cols), value_format, group_size)
    return decode(q), q


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantized_decompress_is_bit_exact_over_shapes_sparsities_and_group_boundaries(path, dtype):
    """Odd group sizes put group boundaries inside vector steps; odd row counts start int4 rows mid-byte."""
    for rows in (1, 7, 17):
        for cols in COLS:
            for sparsity in SPARSITIES:
                for fmt, g in QUANT:
                    want, q = quantized(rows, cols, sparsity, dtype, fmt, g)
                    out = torch.full((rows, cols), 7.0, dtype=dtype)
                    assert K.decompress(q, out=out, threads=2) is out
                    assert_bit_exact(out, q, want=want)


@pytest.mark.parametrize("fmt,g", [("int8", 3), ("int4", 64)])
def test_quantized_sparse_matmul_matches_reference_on_every_path(path, fmt, g, monkeypatch):
    """Fused (quantized rows dequantized into a scratch row) up to MATVEC_MAX_BATCH, decompress + linear
    beyond; exact activations (int8 ones: below)."""
    monkeypatch.setenv(K.EXACT_QUANT_ENV, "1")
    for dtype in DTYPES:
        want_w, q = quantized(65, BLOCK_COLS + 1, 0.5, dtype, fmt, g)
        for batch in (1, 3, 17):
            x = torch.randn(batch, BLOCK_COLS + 1).to(dtype)
            got = K.sparse_matmul(x, q)
            want = x.float() @ want_w.float().T
            tol = fp32_error_bound(x, want_w) + 2 * torch.finfo(dtype).eps * want.abs()
            assert got.dtype == dtype and ((got.float() - want).abs() <= tol).all(), (dtype, batch)


def test_quantized_fused_matvec_matches_fp32_reference_within_accumulation_error(native_path):
    for fmt, g in QUANT:
        for rows, cols in [(1, 1), (7, 17), (17, 63), (3, BLOCK_COLS + 1)]:
            for sparsity in SPARSITIES:
                w, q = quantized(rows, cols, sparsity, torch.bfloat16, fmt, g)
                x = torch.randn(5, cols)
                got = native.matvec(x, q, path=native_path, threads=2)
                assert ((got - x @ w.float().T).abs() <= fp32_error_bound(x, w)).all(), (fmt, g, rows, cols, sparsity)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32], ids=str)
def test_quantized_matvec_equals_the_plain_matvec_of_its_dequantized_values_bit_for_bit(native_path, dtype, xdtype):
    """Dequantizing inside the multiply loop (AVX-512) or into a scratch row first (other paths) gives
    exactly the bits of the plain kernel run on the dequantized values under the same bitmask: the
    same weights, summed in the same order. Group sizes 1, 7, 5, 32 and 128 put group boundaries
    everywhere inside 32-column steps (several per step for small G); batches cover every group of 4."""
    for fmt, g in QUANT + [("int8", 1), ("int4", 1), ("int8", 128), ("int4", 128)]:
        for rows, cols in [(1, 1), (7, 17), (17, 63), (5, 64), (3, BLOCK_COLS + 1), (2, 2 * BLOCK_COLS + 33)]:
            for sparsity in SPARSITIES:
                _, q = quantized(rows, cols, sparsity, dtype, fmt, g)
                plain = BitmapTensor(q.shape, dequantize_values(q).to(dtype), q.bitmask, q.row_offsets, q.block_offsets)
                for batch in (1, 2, 5, 9):
                    x = torch.randn(batch, cols).to(xdtype)
                    got = native.matvec(x, q, path=native_path, threads=2)
                    want = native.matvec(x, plain, path=native_path, threads=2)
                    assert torch.equal(bits(got), bits(want)), (fmt, g, rows, cols, sparsity, batch)


def test_native_kernels_reject_group_offsets_outside_scales(native_path, monkeypatch):
    """A corrupt quantized matrix raises FormatError naming the row; no read outside `scales`."""
    monkeypatch.setenv(K.ENV_VAR, native_path)
    _, q = quantized(6, 100, 0.5, torch.bfloat16, "int4", 8)
    go = q.group_offsets.clone()
    go[4] = q.scales.numel()  # row 4's groups would start past the end of scales
    bad = dataclasses.replace(q, group_offsets=go)
    with pytest.raises(FormatError, match=r"row 4 is inconsistent.*group_offsets point outside scales"):
        K.decompress(bad)
    with pytest.raises(FormatError, match=r"row 4 is inconsistent"):
        K.sparse_matmul(torch.ones(1, 100, dtype=torch.bfloat16), bad)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("corrupt", ["count_up", "count_down"])
def test_quantized_rows_whose_mask_disagrees_with_the_offsets_are_refused_mid_matrix(native_path, monkeypatch, fmt,
                                                                                      corrupt):
    """A row far from the end of the values has its mask counted by the kernel as it goes (no count
    could read outside the buffers there): a disagreement is still found and names a row, on every
    path, for quantized values as for plain ones."""
    monkeypatch.setenv(K.ENV_VAR, native_path)
    _, q = quantized(40, 300, 0.5, torch.bfloat16, fmt, 32)
    ro = q.row_offsets.clone()
    ro[10] += 1 if corrupt == "count_up" else -1  # rows 9 and 10 disagree with their masks
    bad = dataclasses.replace(q, row_offsets=ro)
    with pytest.raises(FormatError, match=r"row (9|10)\b"):
        K.sparse_matmul(torch.ones(1, 300, dtype=torch.bfloat16), bad)
    with pytest.raises(FormatError, match=r"row (9|10)\b"):
        K.decompress(bad)


# ------------------------------------------------------------------------------------------------
# quantized values with int8 activations (AVX2: csrc/matvec_qx.c; AVX-512 VNNI: csrc/matvec_qx512.c)

INT8_X_PATHS = ["avx512", "avx2"]


@pytest.fixture
def avx2():
    _skip_unless_runs("avx2")
    return "avx2"


@pytest.fixture(params=INT8_X_PATHS)
def int8x(request):
    """Each path with an int8-activation kernel, skipped where this CPU lacks its instructions."""
    _skip_unless_runs(request.param)
    if request.param not in native.int8_x_paths():
        pytest.skip(f"this CPU has no {request.param} int8-activation kernel (AVX-512 needs VNNI)")
    return request.param


def test_int8_activation_kernels_run_where_their_instructions_are():
    flags = K._cpu_flags()
    paths = native.int8_x_paths()
    if native.LOAD_ERROR is None and flags:
        assert ("avx2" in paths) == ("avx2" in native.available_paths())
        assert ("avx512" in paths) == ("avx512" in native.available_paths() and "avx512_vnni" in flags)


def test_activation_quantization_follows_its_formula():
    """Per 32 columns: d = max|x| / 127, xq = round(x / d) within [-127, 127], so |x - xq * d| <= d / 2;
    an all-zero block has d = 0 and xq = 0; a block with Inf or NaN has d = NaN."""
    x = torch.randn(3, 70) * torch.tensor([1e-3, 1.0, 1e4])[:, None]
    x[1, 32:64] = 0
    x[2, 5] = float("inf")
    xq, d = quantize_activations(x)
    assert xq.dtype == torch.int8 and xq.shape == (3, 96) and d.shape == (3, 3)
    assert (xq[:, 70:] == 0).all() and (xq.abs() <= 127).all()
    assert d[1, 1] == 0 and (xq[1, 32:64] == 0).all()
    assert d[2, 0].isnan() and (xq[2, :32] == 0).all()
    ok = d.isfinite()[..., None].expand(3, 3, 32).reshape(3, 96)[:, :70]
    back = xq[:, :70].float() * d.repeat_interleave(32, dim=1)[:, :70]
    assert ((x - back).abs() <= d.repeat_interleave(32, dim=1)[:, :70] / 2 * (1 + 1e-6))[ok].all()
    blocks = torch.nn.functional.pad(x, (0, 26)).reshape(3, 3, 32)
    assert torch.equal(d[0], blocks[0].abs().amax(-1) / 127)


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32], ids=str)
def test_int8_activation_matvec_matches_its_reference_within_fp32_rounding(int8x, xdtype):
    """The integer sums are exact, so the kernel and its float64 reference differ only by the fp32
    rounding of the scaled partial sums; group sizes 1, 5, 7, 32, 128 and per row put group ends
    anywhere inside 32- and 64-column steps, odd row counts start int4 rows mid-byte, batches cover every
    group of 4 rows of x."""
    for fmt, g in QUANT + [("int8", 1), ("int4", 1), ("int8", 128), ("int4", 128), ("int4", 0)]:
        for rows, cols in [(1, 1), (7, 17), (17, 63), (5, 64), (3, 129), (4, 200), (3, BLOCK_COLS + 1), (2, 2 * BLOCK_COLS + 33)]:
            for sparsity in SPARSITIES:
                _, q = quantized(rows, cols, sparsity, torch.bfloat16, fmt, g)
                for batch in (1, 2, 5, 9):
                    x = torch.randn(batch, cols).to(xdtype)
                    got = native.matvec(x, q, path=int8x, threads=2, int8_x=True).double()
                    want, size = sparse_matmul_int8x_reference(x, q)
                    assert ((got - want).abs() <= 64 * 2.0**-24 * size + 1e-30).all(), (fmt, g, rows, cols, sparsity, batch)


def test_int8_activations_cost_at_most_half_a_step_of_x_per_weight(int8x):
    """Against the exact product of x with the unrounded dequantized weights, the only error is x's
    rounding: |y - exact| <= sum_j |W[r, j]| * d(j) / 2 (plus fp32 rounding)."""
    for fmt, g in [("int8", 128), ("int4", 128), ("int8", 7)]:
        _, q = quantized(64, 1000, 0.5, torch.bfloat16, fmt, g)
        w = torch.zeros(q.shape, dtype=torch.float64).masked_scatter_(_unpack(q.bitmask, q.shape[1]),
                                                                      dequantize_values(q).double())
        x = torch.randn(3, 1000) * torch.linspace(0.01, 10, 1000)  # blocks of very different scales
        got = native.matvec(x, q, path=int8x, threads=2, int8_x=True).double()
        _, d = quantize_activations(x)
        half_step = d.double().repeat_interleave(32, dim=1)[:, :1000] / 2
        bound = half_step @ w.abs().T + 1e-5 * (x.double().abs() @ w.abs().T)
        err = (got - x.double() @ w.T).abs()
        assert (err <= bound).all() and (err > 0).any()


def test_sparse_matmul_uses_int8_activations_where_the_path_has_them_unless_exact_is_asked_for(int8x, monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, int8x)
    _, q = quantized(17, 300, 0.5, torch.bfloat16, "int4", 32)
    _, plain = encoded(17, 300, 0.5, torch.bfloat16)
    x = torch.randn(2, 300, dtype=torch.bfloat16)
    assert K.int8_activations(q, int8x) and not K.int8_activations(plain, int8x) and not K.int8_activations(q, "c")
    assert all(K.int8_activations(q, p) == (p in native.int8_x_paths()) for p in NATIVE_PATHS)
    assert K.int8_activations(q, int8x, torch.float16) and not K.int8_activations(q, int8x, torch.float32)
    assert torch.equal(K.sparse_matmul(x.float(), q), native.matvec(x.float(), q, path=int8x, threads=2))  # fp32 x: exact
    fast = native.matvec(x, q, path=int8x, threads=2, int8_x=True).to(torch.bfloat16)
    exact = native.matvec(x, q, path=int8x, threads=2).to(torch.bfloat16)
    assert not torch.equal(fast, exact)
    assert torch.equal(K.sparse_matmul(x, q), fast)
    monkeypatch.setenv(K.EXACT_QUANT_ENV, "1")
    assert not K.int8_activations(q, int8x) and torch.equal(K.sparse_matmul(x, q), exact)


def test_both_int8_activation_kernels_compute_the_same_integers():
    """AVX2 and AVX-512 sum the same exact int32 partial products per 4 columns; only the fp32
    order of the scaled partial sums differs."""
    if not {"avx2", "avx512"} <= set(native.int8_x_paths()):
        pytest.skip("needs both int8-activation kernels (an AVX-512 VNNI CPU)")
    for fmt, g in [("int8", 128), ("int4", 7), ("int8", 0)]:
        _, q = quantized(33, 1000, 0.5, torch.bfloat16, fmt, g)
        x = torch.randn(6, 1000, dtype=torch.bfloat16)
        a = native.matvec(x, q, path="avx2", threads=2, int8_x=True).double()
        b = native.matvec(x, q, path="avx512", threads=2, int8_x=True).double()
        _, size = sparse_matmul_int8x_reference(x, q)
        assert ((a - b).abs() <= 128 * 2.0**-24 * size).all() and not torch.equal(a, native.matvec(x, q, path="avx2", threads=2).double())


def test_int8_activations_give_nan_for_a_non_finite_x_and_fall_back_for_wide_zero_points(int8x):
    _, q = quantized(7, 100, 0.5, torch.bfloat16, "int4", 16)
    x = torch.randn(2, 100)
    x[1, 3] = float("nan")
    y = native.matvec(x, q, path=int8x, threads=1, int8_x=True)
    assert y[0].isfinite().all() and y[1].isnan().all()
    wide = dataclasses.replace(q, zeros=q.zeros.clone().fill_(200))  # not a 4-bit zero point: c - z leaves the int8 lanes
    x = torch.randn(1, 100)
    assert torch.equal(native.matvec(x, wide, path=int8x, threads=1, int8_x=True),
                       native.matvec(x, wide, path=int8x, threads=1))


def test_int8_activations_take_int4_weights_from_every_code_and_zero_point(int8x):
    """int4 weights nibble - zero at the extremes of both (0 and 15; weights from -15 to 15), zero
    points differing from group to group, group ends inside steps, and columns past a partial last
    step: the columns without a value contribute nothing whatever the group's zero point."""
    _, q = quantized(9, 300, 0.6, torch.bfloat16, "int4", 7)
    g = torch.Generator().manual_seed(3)
    nib = torch.randint(0, 16, (q.nnz,), generator=g, dtype=torch.uint8)
    nib[::5], nib[1::5] = 0, 15
    zeros = torch.randint(0, 16, q.zeros.shape, generator=g, dtype=torch.uint8)
    zeros[::3], zeros[1::3] = 0, 15
    q = dataclasses.replace(q, values=pack_int4(nib), zeros=zeros)
    for batch in (1, 3, 6):
        x = torch.randn(batch, 300, dtype=torch.bfloat16)
        got = native.matvec(x, q, path=int8x, threads=2, int8_x=True).double()
        want, size = sparse_matmul_int8x_reference(x, q)
        assert ((got - want).abs() <= 64 * 2.0**-24 * size + 1e-30).all()


# ------------------------------------------------------------------------------------------------
# Triton (in the interpreter, on CPU tensors)

# the interpreter runs each program in Python: few rows, but every column-block boundary case
TRITON_SHAPES = [(1, 1), (7, 17), (3, 65), (2, BLOCK_COLS - 1), (3, BLOCK_COLS + 1), (1, 3 * BLOCK_COLS)]


def rerun_in_triton_interpreter(test) -> bool:
    """Triton reads TRITON_INTERPRET when first imported: unless it is set here, run `test` again in a
    fresh process that sets it (asserting it passed) and return True; return False to run it here."""
    pytest.importorskip("triton", reason="triton is not installed (the gpu extra)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"{__file__}::{test.__name__}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    return True


def test_triton_decompress_is_bit_exact_in_the_interpreter():
    if rerun_in_triton_interpreter(test_triton_decompress_is_bit_exact_in_the_interpreter):
        return
    from sparseferry.kernels import triton_kernels

    for dtype in DTYPES:
        for rows, cols in TRITON_SHAPES:
            for sparsity in (0.0, 0.5, 1.0):
                w = sparse_matrix(rows, cols, sparsity, dtype, seed=rows * cols)
                if sparsity < 1:
                    w[0, 0] = float("nan")
                    w[-1, -1] = float("-inf")
                bt = encode(w)
                out = torch.full((rows, cols), 7.0, dtype=dtype)
                assert triton_kernels.decompress(bt, out) is out
                assert_bit_exact(out, bt)


def test_triton_quantized_decompress_is_bit_exact_in_the_interpreter():
    if rerun_in_triton_interpreter(test_triton_quantized_decompress_is_bit_exact_in_the_interpreter):
        return
    from sparseferry.kernels import triton_kernels

    for dtype in DTYPES:
        for rows, cols in TRITON_SHAPES:
            for sparsity in (0.0, 0.5, 1.0):
                for fmt, g in [("int8", 7), ("int4", 5)]:
                    want, q = quantized(rows, cols, sparsity, dtype, fmt, g)
                    out = torch.full((rows, cols), 7.0, dtype=dtype)
                    assert triton_kernels.decompress(q, out) is out
                    assert_bit_exact(out, q, want=want)


def test_the_native_extension_is_built_and_loads_where_a_compiler_exists():
    """A broken build must fail loudly here, not turn every native-path test into a skip."""
    import platform
    import shutil

    from sparseferry.kernels import native

    if platform.machine() not in ("x86_64", "AMD64", "aarch64") or shutil.which("cc") is None:
        pytest.skip("no C compiler on this platform: the torch reference is the documented fallback")
    assert native.LOAD_ERROR is None, native.LOAD_ERROR
    assert "c" in native.available_paths()
