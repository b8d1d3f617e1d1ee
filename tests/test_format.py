"""The bitmap encoding of one matrix (docs/FORMAT.md, section 1), checked against numpy oracles.

Every expected value here is computed independently of sparseferry.format: the non-zero test from
the raw bits (any bit but the sign set), the bitmask with numpy.packbits, the offsets with numpy
cumulative sums.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseferry.format import (
    BLOCK_COLS,
    BitmapTensor,
    FormatError,
    bitmap_nbytes,
    decode,
    encode,
    format_table,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SPARSITIES = (0.0, 0.01, 0.5, 0.9, 0.999, 1.0)
# Column counts around every boundary of the layout: bytes of the bitmask (8), column blocks (1024).
COLS = (1, 2, 7, 8, 9, 15, 17, 63, 100, 1023, 1024, 1025, 2047, 2049)
_INT = {2: (torch.int16, np.int16, 0x7FFF), 4: (torch.int32, np.int32, 0x7FFFFFFF)}


# ----------------------------------------------------------------------------------------------
# Oracles and matrix makers


def raw_bits(t: torch.Tensor) -> np.ndarray:
    """The bit patterns of a float tensor as a numpy integer array."""
    return t.contiguous().view(_INT[t.element_size()][0]).numpy()


def from_bits(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits)).view(dtype)


def oracle(w: torch.Tensor) -> dict[str, np.ndarray]:
    """What FORMAT.md says the parts of `w` are, computed with numpy from the raw bits."""
    b = raw_bits(w)
    nonzero = (b & _INT[w.element_size()][2]) != 0  # +0.0 and -0.0 are the only zeros
    rows, cols = b.shape
    prefix = np.concatenate([np.zeros((rows, 1), np.int64), np.cumsum(nonzero, axis=1)], axis=1)  # [rows, cols+1]
    return {
        "values": b[nonzero],  # row-major
        "bitmask": np.packbits(nonzero, axis=-1, bitorder="little"),
        "row_offsets": np.concatenate([[0], np.cumsum(nonzero.sum(1))[:-1]]).astype(np.int64),
        "block_offsets": prefix[:, 0:cols:BLOCK_COLS].astype(np.int32),
        "decoded": np.where(nonzero, b, 0),  # -0.0 comes back as +0.0
    }


def random_matrix(rows: int, cols: int, dtype: torch.dtype, sparsity: float, seed: int, any_bits: bool) -> torch.Tensor:
    """A matrix with exactly round(sparsity * rows * cols) zeros, half of them -0.0.

    The other entries are normal random values, or (any_bits) uniformly random bit patterns, which
    include NaNs with payloads, infinities and subnormals.
    """
    rng = np.random.default_rng(seed)
    itype, nptype, magnitude = _INT[torch.finfo(dtype).bits // 8]
    n = rows * cols
    if any_bits:
        b = rng.integers(np.iinfo(nptype).min, np.iinfo(nptype).max, size=n, dtype=nptype, endpoint=True)
        b[(b & magnitude) == 0] = 1  # zeros only where placed below: the smallest subnormal instead
    else:
        w = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dtype)
        w[w == 0] = 1.0
        b = raw_bits(w).copy()
    zeros = rng.permutation(n)[: round(sparsity * n)]
    b[zeros] = 0
    b[zeros[::2]] = np.array(magnitude, dtype=nptype) ^ np.array(-1, dtype=nptype)  # sign bit only: -0.0
    return from_bits(b.reshape(rows, cols), dtype)


def assert_encoding_matches_oracle(w: torch.Tensor) -> None:
    bt = encode(w)
    want = oracle(w)
    assert bt.shape == tuple(w.shape)
    assert bt.dtype == w.dtype
    np.testing.assert_array_equal(raw_bits(bt.values), want["values"])
    np.testing.assert_array_equal(bt.bitmask.numpy(), want["bitmask"])
    assert bt.bitmask.dtype == torch.uint8 and bt.row_offsets.dtype == torch.int64 and bt.block_offsets.dtype == torch.int32
    np.testing.assert_array_equal(bt.row_offsets.numpy(), want["row_offsets"])
    np.testing.assert_array_equal(bt.block_offsets.numpy(), want["block_offsets"])
    np.testing.assert_array_equal(raw_bits(decode(bt)), want["decoded"])


# ----------------------------------------------------------------------------------------------
# Round trip, as a property


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.sampled_from((1, 2, 3, 5, 8, 13)), cols=st.sampled_from(COLS), dtype=st.sampled_from(DTYPES),
       sparsity=st.sampled_from(SPARSITIES), seed=st.integers(0, 2**32 - 1), any_bits=st.booleans())
def test_encode_is_exactly_what_the_spec_says_and_decode_inverts_it(rows, cols, dtype, sparsity, seed, any_bits):
    assert_encoding_matches_oracle(random_matrix(rows, cols, dtype, sparsity, seed, any_bits))


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (1, 4099), (33, 17)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_degenerate_and_odd_shapes_round_trip(shape, dtype, sparsity):
    assert_encoding_matches_oracle(random_matrix(*shape, dtype, sparsity, seed=7, any_bits=False))


def test_negative_zero_decodes_as_positive_zero():
    w = torch.tensor([[-0.0, 1.0, -0.0], [0.0, -0.0, -2.0]], dtype=torch.bfloat16)
    assert raw_bits(w)[0, 0] == np.int16(-0x8000)  # really the -0.0 bit pattern
    bt = encode(w)
    assert bt.nnz == 2
    np.testing.assert_array_equal(raw_bits(decode(bt)), raw_bits(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, -2.0]],
                                                                              dtype=torch.bfloat16)))


@pytest.mark.parametrize("dtype,patterns", [
    # NaNs with payloads (quiet and signalling, both signs), +-Inf, smallest and largest subnormals
    (torch.bfloat16, [0x7FC1, 0x7F81, 0xFFA5, 0x7F80, 0xFF80, 0x0001, 0x807F, 0x007F]),
    (torch.float16, [0x7E01, 0x7C01, 0xFE55, 0x7C00, 0xFC00, 0x0001, 0x83FF, 0x03FF]),
    (torch.float32, [0x7FC00001, 0x7F800001, 0xFFBADBAD, 0x7F800000, 0xFF800000, 0x00000001, 0x807FFFFF, 0x007FFFFF]),
])
def test_nan_payloads_infinities_and_subnormals_are_kept_bit_exact(dtype, patterns):
    itype, nptype, _ = _INT[torch.finfo(dtype).bits // 8]
    b = np.zeros((2, 11), dtype=nptype)
    b.reshape(-1)[1::2][: len(patterns)] = np.array(patterns, dtype=np.uint64).astype(nptype)
    w = from_bits(b, dtype)
    bt = encode(w)
    assert bt.nnz == len(patterns)
    np.testing.assert_array_equal(raw_bits(bt.values), np.array(patterns, dtype=np.uint64).astype(nptype))
    np.testing.assert_array_equal(raw_bits(decode(bt)), b)


def test_all_zero_matrix_stores_no_values_and_decodes_to_zeros():
    bt = encode(torch.zeros(3, 1030, dtype=torch.float16))
    assert bt.nnz == 0
    assert not bt.bitmask.any() and not bt.row_offsets.any() and not bt.block_offsets.any()
    assert torch.equal(decode(bt), torch.zeros(3, 1030, dtype=torch.float16))


# ----------------------------------------------------------------------------------------------
# Pinned bytes and documented numbers


def test_golden_bytes():
    """The worked example of docs/FORMAT.md, 'Golden bytes', byte for byte."""
    w = torch.tensor([[1, 0, 0, -2, 0, 0, 0, 0, 3, 0],
                      [0, 0, 0, 0, 0, 0, 0, 0, 0, 4]], dtype=torch.bfloat16)
    parts = encode(w).parts()
    as_bytes = {k: t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() for k, t in parts.items()}
    assert as_bytes["compressed"] == bytes.fromhex("80 3f 00 c0 40 40 80 40")
    assert as_bytes["bitmask"] == bytes.fromhex("09 01 00 02")
    assert list(parts["bitmask"].shape) == [2, 2]
    assert as_bytes["row_offsets"] == (0).to_bytes(8, "little") + (3).to_bytes(8, "little")
    assert "block_offsets" not in parts  # one column block: all zeros, not stored
    assert as_bytes["shape"] == (2).to_bytes(8, "little") + (10).to_bytes(8, "little")
    doc = DOCS.read_text()
    assert "`80 3f 00 c0 40 40 80 40`" in doc and "`09 01 | 00 02`" in doc  # the doc still says so


def test_docs_table_is_computed_by_format_table():
    doc = DOCS.read_text()
    m = re.search(r"<!-- table:begin -->\n(.*?)\n<!-- table:end -->", doc, re.S)
    assert m, "docs/FORMAT.md lost its table markers"
    assert m.group(1) == format_table(), "regenerate the table with `python -m sparseferry.format --table`"


@pytest.mark.parametrize("dtype", DTYPES)
def test_stored_bytes_follow_the_size_formula(dtype):
    w = random_matrix(5, 2049, dtype, 0.5, seed=1, any_bits=False)
    bt = encode(w)
    elem = w.element_size()
    assert bt.nbytes == elem * bt.nnz + 5 * 257 + 8 * 5 + 4 * 5 * 3 + 16
    assert bt.nbytes == bitmap_nbytes(5, 2049, bt.nnz, elem)
    assert bt.nbytes == sum(t.numel() * t.element_size() for t in bt.parts().values())
    assert bt.dense_nbytes == 5 * 2049 * elem


@pytest.mark.parametrize("rows,cols", [(256, 4096), (8, 4096 * 3), (512, 2048), (256, 512), (64, 1024), (64, 1100)])
def test_half_sparse_bf16_takes_at_most_0_5625_of_dense_plus_1_percent(rows, cols):
    bt = encode(random_matrix(rows, cols, torch.bfloat16, 0.5, seed=2, any_bits=False))
    assert bt.nbytes <= (0.5625 + 0.01) * bt.dense_nbytes  # offsets and headers: at most 1% of the dense bytes


def test_rows_of_one_column_block_pay_only_the_row_offset_above_the_nine_bits_per_element():
    # 256 x 512 bf16 at 50%: values (1 byte/elem) + bitmask (1/8 byte/elem) = 0.5625 of dense, plus an
    # int64 row offset per row (block_offsets is all zeros for one column block, hence not stored)
    # and the 16-byte shape: 8 / 1024 = 0.78% of dense.
    bt = encode(random_matrix(256, 512, torch.bfloat16, 0.5, seed=3, any_bits=False))
    assert "block_offsets" not in bt.parts()
    assert bt.nbytes == 0.5625 * bt.dense_nbytes + 256 * 8 + 16
    wide = encode(random_matrix(4, 2500, torch.bfloat16, 0.5, seed=3, any_bits=False))
    assert wide.parts()["block_offsets"].shape == (4, 3)


# ----------------------------------------------------------------------------------------------
# Assembling from stored parts, and what is rejected


def test_block_offsets_are_recomputed_when_a_checkpoint_lacks_them():
    w = random_matrix(4, 2500, torch.float16, 0.9, seed=4, any_bits=False)
    parts = encode(w).parts()
    del parts["block_offsets"]
    bt = BitmapTensor.from_parts(parts, "p")
    np.testing.assert_array_equal(bt.block_offsets.numpy(), oracle(w)["block_offsets"])
    assert torch.equal(raw_bits_t(decode(bt)), raw_bits_t(decode(encode(w))))


def raw_bits_t(t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(raw_bits(t))


@pytest.mark.parametrize("part,bad,message", [
    ("shape", torch.tensor([2, 10], dtype=torch.int32), "p.shape: expected int64 [2]"),
    ("bitmask", torch.zeros(2, 1, dtype=torch.uint8), "p.bitmask: expected uint8 [2, 2]"),
    ("row_offsets", torch.zeros(3, dtype=torch.int64), "p.row_offsets: expected int64 [2]"),
    ("block_offsets", torch.zeros(2, 2, dtype=torch.int32), "p.block_offsets: expected int32 [2, 1]"),
    ("compressed", torch.zeros(4, dtype=torch.int8), "p.compressed: expected 1-D bf16/fp16/fp32"),
])
def test_parts_of_the_wrong_shape_or_dtype_are_rejected_by_name(part, bad, message):
    parts = encode(torch.eye(2, 10, dtype=torch.bfloat16)).parts()
    parts[part] = bad
    with pytest.raises(FormatError, match=re.escape(message)):
        BitmapTensor.from_parts(parts, "p")


def test_a_missing_part_is_named():
    parts = encode(torch.eye(2, 10)).parts()
    del parts["bitmask"]
    with pytest.raises(FormatError, match=r"missing part p\.bitmask"):
        BitmapTensor.from_parts(parts, "p")


@pytest.mark.parametrize("w,message", [
    (torch.ones(3), "expected a 2-D matrix"),
    (torch.ones(2, 2, 2), "expected a 2-D matrix"),
    (torch.ones(2, 2, dtype=torch.float64), "unsupported dtype torch.float64"),
    (torch.ones(2, 2, dtype=torch.int8), "unsupported dtype torch.int8"),
])
def test_encode_accepts_only_2d_bf16_fp16_fp32(w, message):
    with pytest.raises(FormatError, match=re.escape(message)):
        encode(w)


def test_decode_into_a_preallocated_matrix_overwrites_it():
    w = random_matrix(3, 20, torch.float32, 0.5, seed=5, any_bits=False)
    out = torch.full((3, 20), 7.0)
    assert decode(encode(w), out=out) is out
    np.testing.assert_array_equal(raw_bits(out), oracle(w)["decoded"])
    with pytest.raises(FormatError, match=r"out is torch.float16 \[3, 20\], expected torch.float32 \[3, 20\]"):
        decode(encode(w), out=torch.empty(3, 20, dtype=torch.float16))
