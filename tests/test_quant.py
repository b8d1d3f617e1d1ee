"""Quantized non-zero values (docs/FORMAT.md, section 1b): what is stored, how close it comes back.

The expectations are computed independently of sparseferry: groups by walking each row's non-zeros
in Python, scales as the smallest float16 at or above the ideal one (numpy), error bounds in float64.
The bound is the proven one, not a tolerance: |v - (code - zero) * s| <= s/2 for every value (up to
the quantizer's float64 division: 2**-49 of s), and the dense output is exactly that product rounded
once to the matrix dtype.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import assert_bit_equal, make_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseferry
from sparseferry.validate import seal
from sparseferry.cli import main as cli_main
from sparseferry.convert import ConvertError, convert
from sparseferry.format import FormatError, QuantBitmapTensor, decode, encode
from sparseferry.quant import (
    QuantError,
    default_group_size,
    pack_int4,
    quantize,
    relative_error,
    unpack_int4,
)
from sparseferry.report import inspect_checkpoint, render_inspect
from sparseferry.store import MANIFEST, CheckpointError, open_checkpoint

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SLACK = 2.0**-49  # the float64 division v / s in the quantizer, relative to s
GOLDEN = torch.tensor([[1, 0, 0, -2, 0, 0, 0, 0, 3, 0],
                       [0, 0, 0, 0, 0, 0, 0, 0, 0, 4]], dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Independent oracles


def sparse_matrix(rows: int, cols: int, sparsity: float, dtype: torch.dtype, seed: int, spread: float = 1.0) -> torch.Tensor:
    """Random W with about `sparsity` zeros; magnitudes over `spread` decades (mixed scales per group)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 10.0 ** (spread * (torch.rand(rows, cols, generator=g) - 0.5))
    w = w.to(dtype)
    w[w == 0] = 1.0
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    return w


def walk_groups(w: torch.Tensor, group_size: int):
    """(group index, value indices, values as float64) of every group, row by row (FORMAT.md 1b)."""
    g, i = 0, 0
    for row in w.double().numpy():
        nz = row[row != 0]
        size = group_size or max(len(row), 1)
        for start in range(0, len(nz), size):
            chunk = nz[start:start + size]
            yield g, np.arange(i + start, i + start + len(chunk)), chunk
            g += 1
        i += len(nz)


def smallest_fp16_at_least(x: float) -> float:
    h = np.float16(x)
    if float(h) < x:
        h = np.nextafter(h, np.float16(np.inf))
    return float(h)


def codes_of(q: QuantBitmapTensor) -> np.ndarray:
    c = q.values if q.value_format == "int8" else unpack_int4(q.values, q.nnz)
    return c.numpy().astype(np.int64)


def check_quantization(w: torch.Tensor, q: QuantBitmapTensor, value_format: str, group_size: int) -> None:
    """Everything FORMAT.md 1b promises about q = quantize(w, value_format, group_size)."""
    ref = encode(w)
    assert torch.equal(q.bitmask, ref.bitmask) and torch.equal(q.row_offsets, ref.row_offsets)  # exact pattern
    assert torch.equal(q.block_offsets, ref.block_offsets)
    assert q.nnz == ref.nnz and q.out_dtype == w.dtype and q.scales.dtype == torch.float16
    codes, scales = codes_of(q), q.scales.double().numpy()
    zeros = q.zeros.numpy().astype(np.int64) if q.zeros is not None else None
    groups = list(walk_groups(w, group_size))
    assert len(scales) == len(groups)
    vhat = np.empty(q.nnz)
    for g, idx, v in groups:
        s = scales[g]
        if value_format == "int8":
            assert s == smallest_fp16_at_least(np.abs(v).max() / 127)
            assert np.all(np.abs(codes[idx]) <= 127)
            z = 0
        else:
            lo, hi = min(v.min(), 0.0), max(v.max(), 0.0)
            assert s == smallest_fp16_at_least((hi - lo) / 15)
            z = zeros[g]
            assert 0 <= z <= 15 and np.all((codes[idx] >= 0) & (codes[idx] <= 15))
        vhat[idx] = (codes[idx] - z) * s  # exact in float64 (and in float32)
        err = np.abs(v - vhat[idx])
        assert np.all(err <= s * (0.5 + SLACK)), f"group {g}: error {err.max()} > s/2 = {s / 2}"
    # the dense output: each product rounded once to the matrix dtype, zeros elsewhere
    want = torch.zeros(w.shape, dtype=w.dtype)
    want[w != 0] = torch.from_numpy(vhat).to(torch.float32).to(w.dtype)
    assert_bit_equal(decode(q), want, "decode")


# ----------------------------------------------------------------------------------------------
# The quantizers: bounds, exactness, layout


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.sampled_from((1, 2, 5, 9)), cols=st.sampled_from((1, 7, 17, 64, 65, 300)),
       dtype=st.sampled_from(DTYPES), sparsity=st.sampled_from((0.0, 0.5, 0.9, 1.0)),
       group_size=st.sampled_from((0, 1, 2, 3, 16, 128)), value_format=st.sampled_from(("int8", "int4")),
       spread=st.sampled_from((0.0, 3.0)), seed=st.integers(0, 2**31))
def test_every_value_is_within_half_a_step_and_decodes_to_the_rounded_product(rows, cols, dtype, sparsity, group_size,
                                                                             value_format, spread, seed):
    w = sparse_matrix(rows, cols, sparsity, dtype, seed, spread)
    check_quantization(w, quantize(w, value_format, group_size), value_format, group_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [0, 5, 8])
def test_int8_values_on_a_power_of_two_grid_come_back_bit_exact(dtype, group_size):
    """k * 2**-6 with some |k| = 127 in every group: s = 2**-6 exactly, code = k, nothing lost."""
    g = torch.Generator().manual_seed(group_size)
    k = torch.randint(1, 128, (6, 40), generator=g) * (torch.randint(0, 2, (6, 40), generator=g) * 2 - 1)
    k[torch.rand(6, 40, generator=g) < 0.4] = 0
    w = (k * 2.0**-6).to(dtype)
    for _, idx, _ in walk_groups(w, group_size):  # pin every group's extreme at 127 * 2**-6
        flat = w.view(-1)
        pos = (w.reshape(-1) != 0).nonzero().squeeze(1)[idx[0]]
        flat[pos] = 127 * 2.0**-6
    q = quantize(w, "int8", group_size)
    assert torch.all(q.scales == 2.0**-6)
    assert_bit_equal(decode(q), w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [0, 4, 9])
def test_int4_values_on_a_power_of_two_grid_come_back_bit_exact(dtype, group_size):
    """k * 2**-4, k in -8..7, every group holding -8 and 7: s = 2**-4, zero point 8, nothing lost."""
    g = torch.Generator().manual_seed(group_size)
    rows, cols = 5, 36
    k = torch.randint(-8, 8, (rows, cols), generator=g)
    k[k == 0] = 3
    k[torch.rand(rows, cols, generator=g) < 0.3] = 0
    w = (k * 2.0**-4).to(dtype)
    flat_nz = (w.reshape(-1) != 0).nonzero().squeeze(1)
    for _, idx, _ in walk_groups(w, group_size):
        if len(idx) >= 2:
            w.view(-1)[flat_nz[idx[0]]] = -8 * 2.0**-4
            w.view(-1)[flat_nz[idx[1]]] = 7 * 2.0**-4
    q = quantize(w, "int4", group_size)
    full = [len(idx) >= 2 for _, idx, _ in walk_groups(w, group_size)]
    assert all(full)  # every group was pinned (the matrix has no group of one value)
    assert torch.all(q.scales == 2.0**-4) and torch.all(q.zeros == 8)
    assert_bit_equal(decode(q), w)


def test_groups_are_counted_over_each_rows_non_zeros_and_rows_without_any_have_none():
    w = torch.zeros(4, 12)
    w[0, :10] = torch.arange(1, 11)  # 10 values: groups of 4, 4, 2
    w[2, ::3] = -1.0  # 4 values: one group; row 1 and 3: none
    w[3, 11] = 5.0
    q = quantize(w, "int8", 4)
    assert q.scales.numel() == 3 + 1 + 1
    assert q.group_offsets.tolist() == [0, 3, 3, 4]
    assert q.scales.float().tolist() == pytest.approx([4 / 127, 8 / 127, 10 / 127, 1 / 127, 5 / 127], rel=2**-10)
    per_row = quantize(w, "int8", 0)  # one group per non-empty row
    assert per_row.scales.numel() == 3 and per_row.group_offsets.tolist() == [0, 1, 1, 2]


def test_int4_packs_two_codes_per_byte_low_nibble_first_and_pads_an_odd_count_with_zero():
    codes = torch.tensor([1, 2, 3, 15, 0, 9, 7], dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.tolist() == [0x21, 0xF3, 0x90, 0x07]
    assert torch.equal(unpack_int4(packed, 7), codes)


def test_a_value_that_quantizes_to_zero_keeps_its_bit():
    w = torch.tensor([[100.0, 0.0, 0.1, 0.0]])
    for fmt in ("int8", "int4"):
        q = quantize(w, fmt, 0)
        assert q.nnz == 2 and torch.equal(q.bitmask, encode(w).bitmask)
        d = decode(q)
        assert d[0, 2] == 0 and abs(float(d[0, 0]) - 100.0) <= float(q.scales[0]) / 2


def test_tiny_scales_round_up_to_the_smallest_fp16_subnormal_and_keep_the_bound():
    w = torch.tensor([[1e-9, -3e-9, 0.0, 2e-10]], dtype=torch.float32)
    for fmt in ("int8", "int4"):
        q = quantize(w, fmt, 0)
        assert float(q.scales[0]) == 2.0**-24
        check_quantization(w, q, fmt, 0)


def test_golden_bytes_int8_and_int4():
    """The worked examples of docs/FORMAT.md, 'Golden bytes (quantized)', byte for byte."""
    def as_bytes(parts):
        return {k: t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() for k, t in parts.items()}

    q8 = quantize(GOLDEN, "int8", 0)
    b = as_bytes(q8.parts())
    assert sorted(b) == ["bitmask", "codes", "row_offsets", "scales", "shape"]
    assert b["codes"] == bytes.fromhex("2a ab 7f 7f") and b["scales"] == bytes.fromhex("0d 26 09 28")
    assert b["bitmask"] == bytes.fromhex("09 01 00 02")
    assert b["row_offsets"] == (0).to_bytes(8, "little") + (3).to_bytes(8, "little")
    assert decode(q8)[0].tolist() == [0.9921875, 0, 0, -2.015625, 0, 0, 0, 0, 3, 0]

    q4 = quantize(GOLDEN, "int4", 2)
    b = as_bytes(q4.parts())
    assert sorted(b) == ["bitmask", "codes", "row_offsets", "scales", "shape", "zeros"]
    assert b["codes"] == bytes.fromhex("0f ff") and b["scales"] == bytes.fromhex("67 32 67 32 45 34")
    assert b["zeros"] == bytes.fromhex("0a 00 00")
    assert_bit_equal(decode(q4), GOLDEN)
    doc = (open_docs := __import__("pathlib").Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md").read_text()
    for text in ("`2a ab 7f 7f`", "`0d 26 09 28`", "`0f ff`", "`67 32 67 32 45 34`", "`0a 00 00`"):
        assert text in doc, f"{open_docs} no longer says {text}"


@pytest.mark.parametrize("value_format,code_bytes,group_bytes", [("int8", 1.0, 2), ("int4", 0.5, 3)])
def test_stored_bytes_follow_the_size_formula(value_format, code_bytes, group_bytes):
    for rows, cols, sparsity in ((3, 10, 0.5), (4, 2500, 0.5), (5, 100, 0.9)):
        w = sparse_matrix(rows, cols, sparsity, torch.bfloat16, seed=cols)
        q = quantize(w, value_format, 32)
        nnz, ng = q.nnz, q.scales.numel()
        block = 4 * rows * math.ceil(cols / 1024) if cols > 1024 else 0
        want = math.ceil(code_bytes * nnz) + group_bytes * ng + rows * math.ceil(cols / 8) + 8 * rows + block + 16
        assert q.nbytes == want


@pytest.mark.parametrize("w,fmt,g,message", [
    (torch.tensor([[1.0, float("nan")]]), "int8", 0, "t: 1 non-finite values"),
    (torch.tensor([[1.0, float("inf")]]), "int4", 0, "t: 1 non-finite values"),
    (torch.tensor([[1e10, 1.0]]), "int8", 0, "t: group 0 spans values too large for an fp16 scale"),
    (torch.tensor([[1.0, 2.0]]), "int3", 0, "t: unknown value format 'int3'"),
    (torch.tensor([[1.0, 2.0]]), "int8", -1, "t: group size -1 must be a non-negative integer"),
])
def test_quantize_refuses_what_it_cannot_represent_naming_the_tensor(w, fmt, g, message):
    with pytest.raises(QuantError, match=re.escape(message)):
        quantize(w, fmt, g, name="t")


@pytest.mark.parametrize("fmt,part,bad,message", [
    ("int8", "codes", torch.zeros(3, dtype=torch.int8), "p.codes: expected torch.int8 [4] for 4 int8 values"),
    ("int8", "scales", torch.zeros(2, dtype=torch.float32), "p.scales: expected torch.float16 [2]"),
    ("int4", "codes", torch.zeros(4, dtype=torch.uint8), "p.codes: expected torch.uint8 [2] for 4 int4 values"),
    ("int4", "zeros", torch.zeros(1, dtype=torch.uint8), "p.zeros: expected uint8 [2]"),
    ("int4", "zeros", None, "missing part p.zeros"),
    ("int4", "zeros", torch.tensor([3, 16], dtype=torch.uint8), "p.zeros: group 1 has zero point 16, expected 0..15"),
])
def test_quantized_parts_of_the_wrong_shape_or_dtype_are_rejected_by_name(fmt, part, bad, message):
    q = quantize(GOLDEN, fmt, 0)
    parts = q.parts()
    if bad is None:
        del parts[part]
    else:
        parts[part] = bad
    with pytest.raises(FormatError, match=re.escape(message)):
        QuantBitmapTensor.from_parts(parts, "p", value_format=fmt, group_size=0, out_dtype=torch.bfloat16, nnz=4)
    with pytest.raises(FormatError, match=re.escape("p: unknown value encoding 'int2'")):
        QuantBitmapTensor.from_parts(q.parts(), "p", value_format="int2", group_size=0, out_dtype=torch.bfloat16, nnz=4)


# ----------------------------------------------------------------------------------------------
# Checkpoints: convert --values, inspect, readers


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("quant"), dtype=torch.bfloat16, layers=2)


def test_each_format_has_its_default_group_size():
    """int8 keeps its quality with long groups (and its fused kernel splits fewer steps), int4 needs short ones."""
    bt = encode(torch.randn(3, 2000))
    assert quantize(bt, "int8").group_size == default_group_size("int8") == 512
    assert quantize(bt, "int4").group_size == default_group_size("int4") == 128
    assert quantize(bt, "int8", 0).group_size == 0


@pytest.mark.parametrize("values,group_size", [("int8", 0), ("int8", 16), ("int4", 16), ("int4", 128),
                                               ("int8", None), ("int4", None)])
def test_convert_quantizes_every_encoded_matrix_and_records_its_error(llama_src, tmp_path, values, group_size):
    src, model = llama_src
    dst = tmp_path / "q"
    stats = convert(src, dst, values=values, group_size=group_size, progress=False)
    if group_size is None:  # the format's default, recorded as such
        group_size = default_group_size(values)
    ckpt = open_checkpoint(dst)
    ckpt.verify()
    manifest = json.loads((dst / MANIFEST).read_text())
    assert manifest["values"] == {"format": values, "group_size": group_size}
    sd = model.state_dict()
    quantized = [t for t in ckpt.tensors.values() if t.values is not None]
    assert len(quantized) == stats["quantized"] == 7 * 2  # q, k, v, o, gate, up, down of each layer
    for t in quantized:
        assert t.encoding == "bitmap" and t.values == values and t.group_size == group_size and t.dtype == torch.bfloat16
        assert set(t.parts) >= {"codes", "scales"} and "compressed" not in t.parts
        want = quantize(sd[t.name], values, group_size)  # the same quantizer, from the source weights
        assert_bit_equal(ckpt.load(t.name), decode(want), t.name)
        assert t.rel_error == relative_error(sd[t.name], want)
        assert 0 < t.rel_error < (0.01 if values == "int8" else 0.15)
    for n, t in ckpt.tensors.items():
        if t.values is None:  # norms and embeddings: unchanged
            assert_bit_equal(ckpt.load(n), sd[n], n)
    plain = convert(src, tmp_path / "plain", progress=False)
    assert stats["stored_bytes"] < plain["stored_bytes"]
    rep = inspect_checkpoint(dst)
    for row in rep["layers"][:2]:
        errs = [ckpt.tensors[n].rel_error for n in ckpt.layer_tensors(int(row["group"].split()[1])) if ckpt.tensors[n].rel_error]
        assert row["rel_error_max"] == max(errs) and row["rel_error_mean"] == pytest.approx(sum(errs) / len(errs))
        assert row["values"] == f"{values}/{'row' if group_size == 0 else f'g{group_size}'}"
    assert "rel.err max" in render_inspect(rep)


def test_convert_values_bf16_fp16_cast_the_encoded_matrices_only(llama_src, tmp_path):
    src, model = llama_src
    convert(src, tmp_path / "h", values="fp16", progress=False)
    ckpt = open_checkpoint(tmp_path / "h")
    sd = model.state_dict()
    for n, t in ckpt.tensors.items():
        if t.encoding == "bitmap":
            assert t.dtype == torch.float16 and t.values is None
            assert_bit_equal(ckpt.load(n), sd[n].to(torch.float16), n)
        else:
            assert t.dtype == torch.bfloat16
    assert "rel.err" not in render_inspect(inspect_checkpoint(tmp_path / "h"))


@pytest.mark.parametrize("kw,message", [
    ({"values": "int3"}, "unsupported --values 'int3'"),
    ({"values": "int8", "group_size": -4}, "--group-size -4: expected a non-negative integer"),
])
def test_convert_rejects_unknown_values_and_bad_group_sizes(llama_src, tmp_path, kw, message):
    with pytest.raises(ConvertError, match=re.escape(message)):
        convert(llama_src[0], tmp_path / "x", progress=False, **kw)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("field,value,message", [
    ("values", "int3", "has unknown value encoding 'int3'"),
    ("encoding", "bitmap-zstd", "has unknown encoding 'bitmap-zstd'"),
    ("group_size", -1, "int8 values need a non-negative integer group_size"),
])
def test_readers_reject_unknown_value_encodings_naming_the_tensor(llama_src, tmp_path, field, value, message):
    dst = tmp_path / "q"
    convert(llama_src[0], dst, values="int8", progress=False)
    m = json.loads((dst / MANIFEST).read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    m["tensors"][name][field] = value
    (dst / MANIFEST).write_text(json.dumps(seal(m)))
    with pytest.raises(CheckpointError, match=re.escape(f"tensor {name}") + ".*" + re.escape(message)):
        open_checkpoint(dst)


def test_cli_convert_values_int4_then_inspect(llama_src, tmp_path, capsys):
    dst = tmp_path / "q4"
    assert cli_main(["convert", str(llama_src[0]), str(dst), "--values", "int4", "--group-size", "32", "-q"]) == 0
    out = capsys.readouterr().out
    assert "14 matrices with int4 values, worst relative error 0.0" in out
    assert cli_main(["inspect", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "int4/g32" in out and "rel.err max" in out
    assert cli_main(["inspect", str(dst), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["total"]["quantized"] == 14 and 0 < rep["total"]["rel_error_max"] < 0.15


# ----------------------------------------------------------------------------------------------
# The runtime streams quantized checkpoints: its logits are transformers' on the dequantized weights


@pytest.mark.parametrize("path", ["avx512", "avx2"])
@pytest.mark.parametrize("values", ["int8", "int4"])
def test_int8_activations_keep_a_bf16_model_within_two_percent_of_transformers(values, path, tmp_path, monkeypatch):
    """With int8 activations (the default for quantized values and bf16 x on the paths that have the
    integer kernel: each 32 columns of x rounded to a step of max|x| / 127) the logits of prefill (as
    many rows as the fused kernel takes on this CPU) and of a decode step stay within 2% of the
    largest logit of transformers on the same dequantized weights."""
    import sparseferry.kernels as K

    if path not in K.native.int8_x_paths():
        pytest.skip(f"no {path} int8-activation kernel on this CPU")
    monkeypatch.setenv(K.ENV_VAR, path)
    src, model = make_tiny_model("llama", tmp_path, dtype=torch.bfloat16, layers=3)
    dst = tmp_path / "q"
    convert(src, dst, values=values, group_size=16, progress=False)
    ckpt = open_checkpoint(dst)
    model.load_state_dict({n: ckpt.load(n) for n in ckpt.tensors}, strict=False)
    ids = torch.randint(0, 256, (2, min(11, K.MATVEC_MAX_BATCH // 2)), generator=torch.Generator().manual_seed(1))
    m = sparseferry.load(dst)
    try:
        with torch.no_grad():
            for inp in (ids, ids[:, :1]):
                got, want = m(input_ids=inp).logits.float(), model(input_ids=inp).logits.float()
                err = (got - want).abs().max()
                assert 0 < err <= 0.02 * want.abs().max(), (values, inp.shape, float(err))
    finally:
        m.sparseferry.close()


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("opt", torch.float32), ("llama", torch.bfloat16)],
                         ids=["llama-fp32", "opt-fp32", "llama-bf16"])
@pytest.mark.parametrize("values", ["int8", "int4"])
def test_streamed_quantized_checkpoint_equals_transformers_on_the_dequantized_weights(arch, dtype, values, tmp_path,
                                                                                        monkeypatch):
    """Exact activations (SPARSEFERRY_EXACT_QUANT=1): transformers' numbers within its own rounding.
    The default int8 activations (bf16 x, AVX2 / AVX-512 VNNI): within 2% of the largest logit (test below)."""
    from sparseferry.runtime.plan import make_plan

    monkeypatch.setenv("SPARSEFERRY_EXACT_QUANT", "1")

    src, model = make_tiny_model(arch, tmp_path, dtype=dtype, layers=3)
    dst = tmp_path / "q"
    convert(src, dst, values=values, group_size=16, progress=False)
    ckpt = open_checkpoint(dst)
    # the oracle: every stored tensor decoded by the reference (dequantized), run by transformers
    model.load_state_dict({n: ckpt.load(n) for n in ckpt.tensors}, strict=False)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))  # prefill: batch 22 > fused
    with torch.no_grad():
        want = model(input_ids=ids).logits
    minimum = make_plan(ckpt, None).minimum_bytes
    layer = ckpt.stored_bytes(ckpt.layer_tensors(0))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    for budget in (None, minimum, minimum + 2 * layer + 4096):
        m = sparseferry.load(dst, memory_budget=budget)
        try:
            with torch.no_grad():
                got = m(input_ids=ids).logits
                step = m(input_ids=ids[:, :1]).logits  # batch 2: the fused quantized matvec
        finally:
            m.sparseferry.close()
        torch.testing.assert_close(got, want, **tol, msg=lambda s: f"{values} budget={budget}: {s}")
        with torch.no_grad():
            torch.testing.assert_close(step, model(input_ids=ids[:, :1]).logits, **tol)
