"""A checkpoint is checked against its own bytes before anything is computed on it (docs/FORMAT.md, 4).

Every manifest edit below is resealed (its manifest digest recomputed), as a forger would: the
checks that catch it are the structural ones, not the digest. Each is refused at open, with one
line naming the file, the tensor and what was expected.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_checkpoint

import sparseferry
from sparseferry.format import FormatError, decode, encode
from sparseferry.kernels import decompress
from sparseferry.quant import decode_quant, quantize
from sparseferry.report import inspect_checkpoint
from sparseferry.store import MANIFEST, CheckpointError, layer_file, open_checkpoint
from sparseferry.validate import seal

UP = "model.layers.0.mlp.up_proj.weight"
GATE = "model.layers.0.mlp.gate_proj.weight"


@pytest.fixture
def ckpt_dir(tmp_path):
    return make_checkpoint("llama", tmp_path, dtype=torch.float32, layers=2).folder


def edit(folder, fn, sealed: bool = True):
    m = json.loads((folder / MANIFEST).read_text())
    fn(m)
    (folder / MANIFEST).write_text(json.dumps(seal(m) if sealed else m))


def refused(folder, pattern: str):
    """open, load and inspect --verify all raise one line matching `pattern`."""
    for action in (lambda: open_checkpoint(folder), lambda: sparseferry.load(folder, memory_budget="1GiB"),
                   lambda: inspect_checkpoint(folder, verify=True)):
        with pytest.raises(CheckpointError, match=pattern) as e:
            action()
        assert "\n" not in str(e.value)


def part(m, name, key="compressed"):
    return m["tensors"][name]["parts"][key]


@pytest.mark.parametrize("shift", [2, 8, -8])
def test_a_moved_part_offset_is_refused(ckpt_dir, shift):
    edit(ckpt_dir, lambda m: part(m, UP).update(offset=part(m, UP)["offset"] + shift))
    refused(ckpt_dir, rf"{layer_file(0)}: tensor {UP}, part compressed: "
                      r"(the safetensors header has .* manifest says|bytes .* are not inside|offset \d+ is not aligned)")


def test_a_part_pointing_into_the_header_is_refused(ckpt_dir):
    edit(ckpt_dir, lambda m: part(m, UP).update(offset=16))
    refused(ckpt_dir, rf"tensor {UP}, part compressed: bytes \[16, \d+\) are not inside the file's data \[\d+, \d+\)")


def test_a_zero_length_part_is_refused(ckpt_dir):
    edit(ckpt_dir, lambda m: part(m, UP).update(nbytes=0))
    refused(ckpt_dir, rf"tensor {UP}, part compressed: nbytes 0, expected \d+ for float32 \[\d+\]")


def test_a_part_whose_shape_disagrees_with_its_tensor_is_refused(ckpt_dir):
    def fn(m):
        p = part(m, UP, "bitmask")
        p["shape"] = [p["shape"][0] * 2, p["shape"][1] // 2]
    edit(ckpt_dir, fn)
    refused(ckpt_dir, rf"tensor {UP}, part bitmask: is uint8 \[\d+, \d+\], expected uint8 \[\d+, \d+\]")


def test_swapped_entries_of_two_same_shaped_tensors_are_refused(ckpt_dir):
    def fn(m):
        t = m["tensors"]
        t[UP], t[GATE] = t[GATE], t[UP]
    edit(ckpt_dir, fn)
    refused(ckpt_dir, r"tensor model.layers.0.mlp.(up|gate)_proj.weight, part \w+: stored under '.*(gate|up)_proj.*', "
                      r"expected '.*(up|gate)_proj.*' \(a part of another tensor\?\)")


def test_parts_of_one_tensor_claimed_by_another_are_refused(ckpt_dir):
    edit(ckpt_dir, lambda m: m["tensors"].update({"model.layers.0.mlp.extra.weight": m["tensors"][UP]}))
    refused(ckpt_dir, r"(stored under .* expected|claimed by two manifest entries)")


def test_overlapping_parts_are_refused(ckpt_dir):
    """Two parts made to share bytes, header and manifest forged alike: the layout check still sees it."""
    from corpus import reseal_file
    m = json.loads((ckpt_dir / MANIFEST).read_text())
    a, b = part(m, UP, "row_offsets"), part(m, GATE, "row_offsets")
    path = ckpt_dir / layer_file(0)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header[b["name"]]["data_offsets"] = header[a["name"]]["data_offsets"]
    raw = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(data[:8] + raw + b" " * (n - len(raw)) + data[8 + n:])
    b["offset"] = a["offset"]
    reseal_file(ckpt_dir, layer_file(0), m)
    refused(ckpt_dir, r"parts .*row_offsets and .*row_offsets overlap")


def test_an_edited_manifest_is_refused_by_its_digest(ckpt_dir):
    edit(ckpt_dir, lambda m: m["config"].update(rms_norm_eps=0.5), sealed=False)
    refused(ckpt_dir, rf"{MANIFEST}: manifest digest mismatch .*modified after it was written")


@pytest.mark.parametrize("rel", ["../outside.safetensors", "/etc/hostname"])
def test_a_manifest_file_outside_the_folder_is_refused(ckpt_dir, rel):
    edit(ckpt_dir, lambda m: m["files"].update({rel: m["files"][layer_file(0)]}))
    refused(ckpt_dir, r"is not a path inside the checkpoint")


def test_a_tensor_in_another_layers_file_is_refused(ckpt_dir):
    edit(ckpt_dir, lambda m: m["tensors"][UP].update(layer=1))
    refused(ckpt_dir, rf"tensor {UP} says layer 1 in {layer_file(0)}")


@pytest.mark.parametrize("field,value,pattern", [
    ("nnz", -1, r"nnz -1 is not an integer"), ("nnz", "12", r"nnz '12' is not an integer"),
    ("shape", [64, "x"], r"shape .* is not a list of non-negative integers"),
    ("dtype", "complex64", r"dtype 'complex64' is not one a checkpoint holds"),
    ("encoding", "sparse", r"unknown encoding 'sparse'"),
])
def test_malformed_tensor_fields_are_refused(ckpt_dir, field, value, pattern):
    edit(ckpt_dir, lambda m: m["tensors"][UP].update({field: value}))
    refused(ckpt_dir, rf"tensor {UP}.*{pattern}")


def test_a_dense_tensor_relabelled_to_another_dtype_is_refused_at_load(tmp_path):
    """fp16 <-> bf16 bytes relabelled consistently in header and manifest: only the model can tell."""
    from corpus import reseal_file
    folder = make_checkpoint("llama", tmp_path, dtype=torch.bfloat16, layers=2).folder
    name = "model.layers.0.input_layernorm.weight"
    path = folder / layer_file(0)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header[name]["dtype"] = "F16"
    raw = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(data[:8] + raw + b" " * (n - len(raw)) + data[8 + n:])
    m = json.loads((folder / MANIFEST).read_text())
    m["tensors"][name]["dtype"] = m["tensors"][name]["parts"]["dense"]["dtype"] = "float16"
    reseal_file(folder, layer_file(0), m)
    open_checkpoint(folder).verify()  # self-consistent on its own
    with pytest.raises(CheckpointError, match=rf"tensor {name} is stored as torch.float16 in a torch.bfloat16 model"):
        sparseferry.load(folder)


# -- every decoder path checks the row spans it decodes


def _bad(kind: str):
    w = torch.randn(6, 40)
    w[w.abs() < 0.7] = 0
    bt = encode(w)
    if kind == "more-bits":  # one set bit more than there are values
        r, c = (bt.bitmask != 0xFF).nonzero()[0].tolist()
        bt.bitmask[r, c] |= bt.bitmask[r, c] + 1  # the lowest clear bit
    elif kind == "fewer-bits":  # one fewer: every later weight would shift
        r, c = (bt.bitmask != 0).nonzero()[0].tolist()
        bt.bitmask[r, c] &= bt.bitmask[r, c] - 1
    else:  # a row span moved, totals unchanged
        bt.row_offsets[2] += 1
    return bt


@pytest.mark.parametrize("kind", ["more-bits", "fewer-bits", "shifted-row"])
@pytest.mark.parametrize("path", ["reference", "torch", "native"])
def test_every_decoder_checks_row_spans(kind, path, monkeypatch):
    bt = _bad(kind)
    if path == "reference":
        run = lambda b: decode(b)  # noqa: E731
    else:
        from sparseferry.kernels import native
        if path == "native" and not native.available_paths():
            pytest.skip("native kernels not built")
        monkeypatch.setenv("SPARSEFERRY_KERNEL", "torch" if path == "torch" else native.available_paths()[0])
        run = lambda b: decompress(b)  # noqa: E731
    with pytest.raises(FormatError, match=r"row_offsets disagree with the bitmask|row \d+ is inconsistent"):
        run(bt)
    q = quantize(encode(decode(encode(torch.where(torch.rand(6, 40) < 0.5, torch.randn(6, 40), 0.0)))), "int8", 4)
    q.row_offsets[1] += 1
    with pytest.raises(FormatError):
        decode_quant(q) if path == "reference" else run(q)
