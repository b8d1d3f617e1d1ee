"""Expert parameters in the checkpoint (docs/FORMAT.md, section 2b): one ordinary stored tensor per
expert, one contiguous 8-byte-aligned byte range per expert per layer, read and verified on its own."""
from __future__ import annotations

import json

import pytest
import torch

from sparseferry.format import BitmapTensor, QuantBitmapTensor, decode
from sparseferry.io import aligned_empty, buffer_size_for
from sparseferry.quant import decode_quant
from sparseferry.validate import seal
from sparseferry.store import (
    CheckpointError,
    CheckpointWriter,
    _read_header,
    open_checkpoint,
    prepare,
    prepare_experts,
)

BF = torch.bfloat16
LAYER = "layers/layer-00000.safetensors"


def _sparse(shape, seed, sparsity=0.6, dtype=BF):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w[torch.rand(shape, generator=g) < sparsity] = 0
    return w.to(dtype)


def _write(dst, layer_tensors, num_layers=1):
    with CheckpointWriter(dst, config={}, architecture="X", layers_prefix="m.layers", num_layers=num_layers) as w:
        for i, tensors in enumerate(layer_tensors):
            w.write_file(f"layers/layer-{i:05d}.safetensors", tensors, i)
        w.commit()
    return open_checkpoint(dst)


def _moe_layer(values=None, E=4):
    gate_up, down, bias = _sparse((E, 24, 40), 1), _sparse((E, 40, 12), 2), torch.randn(E, 24).to(BF)
    norm = torch.randn(40).to(BF)
    attn = _sparse((40, 40), 3)
    tensors = [prepare("m.layers.0.norm.weight", norm, False),
               prepare("m.layers.0.attn.weight", attn, True, values=values),
               prepare_experts("m.layers.0.mlp.experts.gate_up_proj", gate_up, True, values=values),
               prepare_experts("m.layers.0.mlp.experts.down_proj", down, True, values=values),
               prepare_experts("m.layers.0.mlp.experts.gate_up_proj_bias", bias, True, values=values)]
    return tensors, {"m.layers.0.norm.weight": norm, "m.layers.0.attn.weight": attn,
                     "m.layers.0.mlp.experts.gate_up_proj": gate_up, "m.layers.0.mlp.experts.down_proj": down,
                     "m.layers.0.mlp.experts.gate_up_proj_bias": bias}


def _dense(x):
    if isinstance(x, QuantBitmapTensor):
        return decode_quant(x)
    return decode(x) if isinstance(x, BitmapTensor) else x


def test_expert_parameters_round_trip_exactly(tmp_path):
    tensors, ref = _moe_layer()
    ckpt = _write(tmp_path / "c", [tensors])
    ckpt.verify()
    for name, w in ref.items():
        assert torch.equal(ckpt.load(name), w), name
    assert ckpt.num_experts(0) == 4
    assert ckpt.expert_params(0) == ["m.layers.0.mlp.experts.gate_up_proj", "m.layers.0.mlp.experts.down_proj",
                                     "m.layers.0.mlp.experts.gate_up_proj_bias"]
    e = ckpt.tensors["m.layers.0.mlp.experts.gate_up_proj"]
    assert e.encoding == "experts" and e.shape == (4, 24, 40) and e.num_experts == 4
    assert [sub.encoding for sub in e.experts] == ["bitmap"] * 4  # 2-D slices are bitmap-encoded
    assert [sub.encoding for sub in ckpt.tensors["m.layers.0.mlp.experts.gate_up_proj_bias"].experts] == ["dense"] * 4
    assert e.nnz == int((ref["m.layers.0.mlp.experts.gate_up_proj"] != 0).sum())


def test_each_expert_is_one_aligned_contiguous_range_after_the_base(tmp_path):
    tensors, _ = _moe_layer()
    ckpt = _write(tmp_path / "c", [tensors])
    path, a, z = ckpt.layer_range(0)
    _, b0, b1 = ckpt.base_range(0)
    assert (b0, a) == (a, a)  # the base comes first
    prev = b1
    header = _read_header(path)
    fe = ckpt.files[LAYER]
    for e in range(4):
        _, s, t = ckpt.expert_range(0, e)
        assert s % 8 == 0 and 0 <= s - prev < 8  # aligned, only padding in between
        assert ckpt.expert_bytes(0, e) == t - s
        # every part of expert e (of every expert parameter) lies inside its range, and nothing else does
        inside = {k for k, h in header.items() if k != "__metadata__"
                  and s <= fe["data_start"] + h["data_offsets"][0] < t}
        assert inside == {p["name"] for n in ckpt.expert_params(0) for p in ckpt.tensors[n].experts[e].parts.values()}
        prev = t
    assert prev == z
    assert ckpt.base_bytes(0) == sum(ckpt.tensors[n].stored_bytes for n in ckpt.base_params(0))


@pytest.mark.parametrize("values", [None, "int8", "int4"])
def test_read_expert_and_read_base_give_each_piece_alone(tmp_path, values):
    tensors, ref = _moe_layer(values)
    ckpt = _write(tmp_path / "c", [tensors])
    whole = ckpt.layer_views(0, _layer_bytes(ckpt))  # the whole-layer read still works
    for e in range(4):
        _, s, t = ckpt.expert_range(0, e)
        views = ckpt.expert_views(0, e, ckpt.read_expert(0, e, aligned_empty(buffer_size_for(s, t)), direct=False))
        assert set(views) == set(ckpt.expert_params(0))
        for n, v in views.items():
            assert torch.equal(_dense(v), _dense(whole[n][e]))  # layer_views: a list of E stored forms
            if values is None:
                assert torch.equal(_dense(v), ref[n][e])
        if values is not None:
            assert isinstance(views["m.layers.0.mlp.experts.down_proj"], QuantBitmapTensor)
    _, s, t = ckpt.base_range(0)
    base = ckpt.base_views(0, ckpt.read_base(0, aligned_empty(buffer_size_for(s, t)), direct=False))
    assert set(base) == {"m.layers.0.norm.weight", "m.layers.0.attn.weight"}
    assert torch.equal(base["m.layers.0.norm.weight"], ref["m.layers.0.norm.weight"])


def _layer_bytes(ckpt):
    path, a, z = ckpt.layer_range(0)
    return torch.frombuffer(bytearray(path.read_bytes()[a:z]), dtype=torch.uint8)


def test_a_corrupt_expert_is_named_and_other_experts_still_read(tmp_path):
    tensors, _ = _moe_layer()
    ckpt = _write(tmp_path / "c", [tensors])
    path, s, t = ckpt.expert_range(0, 2)
    raw = bytearray(path.read_bytes())
    raw[t - 1] ^= 0xFF
    path.write_bytes(bytes(raw))
    ckpt = open_checkpoint(tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"checksum mismatch in expert 2 of layer 0 \(tensor m\.layers\.0\.mlp\.experts\..*experts\.2\."):
        ckpt.read_expert(0, 2, aligned_empty(buffer_size_for(s, t)), direct=False)
    _, s1, t1 = ckpt.expert_range(0, 1)
    ckpt.read_expert(0, 1, aligned_empty(buffer_size_for(s1, t1)), direct=False)
    _, s0, t0 = ckpt.base_range(0)
    ckpt.read_base(0, aligned_empty(buffer_size_for(s0, t0)), direct=False)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ckpt.verify()


def test_layers_without_experts_are_laid_out_as_before(tmp_path):
    w = _sparse((40, 40), 3)
    ckpt = _write(tmp_path / "c", [[prepare("m.layers.0.attn.weight", w, True)]])
    fe = ckpt.files[LAYER]
    assert "base" not in fe and "experts" not in fe
    assert ckpt.num_experts(0) == 0 and ckpt.expert_params(0) == []
    assert ckpt.base_range(0) == ckpt.layer_range(0)
    with pytest.raises(CheckpointError, match="no expert 0 in layer 0"):
        ckpt.expert_range(0, 0)


def test_experts_of_inconsistent_shapes_or_counts_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"gate_up_proj: expert 1 is \[3, 8\] bfloat16, expert 0 is \[4, 8\]"):
        prepare_experts("m.layers.0.mlp.experts.gate_up_proj", [_sparse((4, 8), 0), _sparse((3, 8), 1)], True)
    a = prepare_experts("m.layers.0.a", _sparse((2, 4, 8), 0), True)
    b = prepare_experts("m.layers.0.b", _sparse((3, 4, 8), 0), True)
    with pytest.raises(CheckpointError, match="m.layers.0.b has 3 experts, m.layers.0.a has 2"):
        _write(tmp_path / "c", [[a, b]])
    assert not (tmp_path / "c").exists()


def _tamper(tmp_path, edit):
    tensors, _ = _moe_layer()
    _write(tmp_path / "c", [tensors])
    mpath = tmp_path / "c" / "sparseferry.json"
    m = json.loads(mpath.read_text())
    edit(m)
    mpath.write_text(json.dumps(seal(m)))  # resealed: the structure checks, not the manifest digest, must refuse it
    return tmp_path / "c"


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["tensors"]["m.layers.0.mlp.experts.down_proj"].update(num_experts=3), "expected num_experts"),
    (lambda m: m["tensors"]["m.layers.0.mlp.experts.down_proj"]["experts"][1].update(shape=[40, 11]),
     r"expert 1 is \[40, 11\]"),
    (lambda m: m["tensors"]["m.layers.0.mlp.experts.down_proj"]["experts"][1].update(encoding="experts"),
     "cannot itself hold experts"),
    (lambda m: m["tensors"]["m.layers.0.mlp.experts.down_proj"]["experts"][0].update(encoding="csr"),
     "unknown encoding 'csr'"),
    (lambda m: m["tensors"]["m.layers.0.mlp.experts.down_proj"].update(nnz=1), "not the sum of its experts"),
    (lambda m: m["files"][LAYER]["experts"].pop(), "has 4 experts, file layers/layer-00000.safetensors has 3"),
    (lambda m: m["files"][LAYER]["experts"][0].update(start=0), "malformed byte range"),
    (lambda m: m["files"][LAYER]["experts"][1].update(start=m["files"][LAYER]["experts"][1]["start"] + 8),
     "lies outside expert 1 of layer 0"),
    (lambda m: m["tensors"]["m.layers.0.mlp.experts.down_proj"]["experts"][0].pop("parts"), "expert 0: entry lacks .parts."),
])
def test_malformed_expert_entries_are_refused_by_name(tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(_tamper(tmp_path, edit))


def test_golden_bytes(tmp_path):
    """docs/FORMAT.md section 2b: the example layer, byte for byte."""
    w0 = torch.zeros(2, 16)
    w0[0, 0], w0[0, 3], w0[0, 8], w0[1, 9] = 1, -2, 3, 4
    ckpt = _write(tmp_path / "g", [[
        prepare("m.layers.0.norm.weight", torch.tensor([1, 2], dtype=BF), False),
        prepare_experts("m.layers.0.mlp.experts.down_proj", torch.stack([w0, -w0]).to(BF), True),
        prepare_experts("m.layers.0.mlp.experts.down_proj_bias", torch.tensor([[0.5, -0.5], [1, -1]], dtype=BF), True),
    ]])
    fe = ckpt.files[LAYER]
    ds = fe["data_start"]
    data = (tmp_path / "g" / LAYER).read_bytes()[ds:]
    P, Q = "m.layers.0.mlp.experts.down_proj", "m.layers.0.mlp.experts.down_proj_bias"
    expected = [
        ("m.layers.0.norm.weight", "80 3f 00 40"),
        ("__pad__.0", "00 00 00 00"),
        (f"{P}.experts.0.row_offsets", "00 00 00 00 00 00 00 00 03 00 00 00 00 00 00 00"),
        (f"{P}.experts.0.shape", "02 00 00 00 00 00 00 00 10 00 00 00 00 00 00 00"),
        (f"{P}.experts.0.compressed", "80 3f 00 c0 40 40 80 40"),
        (f"{Q}.experts.0", "00 3f 00 bf"),
        (f"{P}.experts.0.bitmask", "09 01 00 02"),
        (f"{P}.experts.1.row_offsets", "00 00 00 00 00 00 00 00 03 00 00 00 00 00 00 00"),
        (f"{P}.experts.1.shape", "02 00 00 00 00 00 00 00 10 00 00 00 00 00 00 00"),
        (f"{P}.experts.1.compressed", "80 bf 00 40 40 c0 80 c0"),
        (f"{Q}.experts.1", "80 3f 80 bf"),
        (f"{P}.experts.1.bitmask", "09 01 00 02"),
    ]
    header = _read_header(tmp_path / "g" / LAYER)
    assert sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]) == [n for n, _ in expected]
    assert data.hex(" ") == " ".join(h for _, h in expected)
    assert (fe["base"]["start"] - ds, fe["base"]["end"] - ds) == (0, 4)
    assert [(r["start"] - ds, r["end"] - ds) for r in fe["experts"]] == [(8, 56), (56, 104)]
    sub = ckpt.tensors[P].experts[1]
    assert (sub.encoding, sub.shape, sub.nnz) == ("bitmap", (2, 16), 4)
    assert ckpt.tensors[Q].experts[0].encoding == "dense"
