"""The checkpoint store (docs/FORMAT.md, sections 2-4): files, manifest, reading, and what is rejected."""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
import safetensors
import torch
import xxhash
from conftest import (
    assert_bit_equal,
    assert_nothing_written,
    file_size_limit,
    leftovers,
    magnitude_prune_,
)
from safetensors.torch import load_file

import sparseferry.io as sf_io
from sparseferry.validate import seal
from sparseferry.format import BitmapTensor, encode
from sparseferry.io import FileReader, aligned_empty, buffer_size_for
from sparseferry.store import (
    EXTRA_FILE,
    MANIFEST,
    CheckpointError,
    CheckpointWriter,
    from_bitmap,
    layer_file,
    open_checkpoint,
    prepare,
)

_ELEM = {"I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "U8": 1}


def pruned(rows: int, cols: int, dtype: torch.dtype, sparsity: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return magnitude_prune_(torch.randn(rows, cols, generator=g).to(dtype), sparsity)


def toy_tensors(num_layers: int = 2) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Per-layer and extra tensors covering every storage case: bf16/fp16/fp32 bitmaps over one and two
    column blocks, a matrix too dense to encode (dense fallback), 1-D dense parameters."""
    layers = {}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        layers[i] = {
            p + "self_attn.q_proj.weight": pruned(32, 40, torch.float32, 0.9, seed=10 * i),
            p + "mlp.up_proj.weight": pruned(48, 1100, torch.bfloat16, 0.5, seed=10 * i + 1),
            p + "mlp.down_proj.weight": pruned(24, 300, torch.float16, 0.03, seed=10 * i + 2),  # -> dense
            p + "input_layernorm.weight": torch.randn(40).to(torch.bfloat16),
        }
    extra = {"model.embed_tokens.weight": torch.randn(50, 40).to(torch.bfloat16), "model.norm.weight": torch.ones(40)}
    return layers, extra


def write_checkpoint(dst: Path, layers: dict, extra: dict, **writer_kw) -> Path:
    with CheckpointWriter(dst, config={"model_type": "toy"}, architecture="ToyForCausalLM",
                          layers_prefix="model.layers", num_layers=len(layers), **writer_kw) as w:
        for i, tensors in layers.items():
            w.write_file(layer_file(i), [prepare(n, t, sparse=t.dim() == 2) for n, t in tensors.items()], i)
        w.write_file(EXTRA_FILE, [prepare(n, t, sparse=False) for n, t in extra.items()], None)
        return w.commit()


@pytest.fixture(scope="module")
def pristine_toy(tmp_path_factory):
    layers, extra = toy_tensors()
    dst = write_checkpoint(tmp_path_factory.mktemp("pristine") / "toy", layers, extra)
    everything = dict(extra)
    for tensors in layers.values():
        everything.update(tensors)
    return dst, everything


@pytest.fixture
def toy(pristine_toy, tmp_path):
    """(checkpoint folder, {name: source tensor}) of a hand-written 2-layer checkpoint, this test's own copy."""
    src, everything = pristine_toy
    return Path(shutil.copytree(src, tmp_path / "toy")), everything


def header_of(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return 8 + n, json.loads(f.read(n))


def assert_same_stored(a, b, what: str) -> None:
    assert type(a) is type(b), what
    if isinstance(a, BitmapTensor):
        assert a.shape == b.shape, what
        for part, t in a.parts().items():
            assert_bit_equal(t, b.parts()[part], f"{what}.{part}")
    else:
        assert_bit_equal(a, b, what)


# ----------------------------------------------------------------------------------------------
# Writing and reading back


def test_every_tensor_reads_back_bit_for_bit(toy):
    dst, src = toy
    ckpt = open_checkpoint(dst)
    assert set(ckpt.tensors) == set(src)
    for name, t in src.items():
        assert_bit_equal(ckpt.load(name), t, name)
        assert_bit_equal(ckpt.load(name, verify=True), t, name)


def test_sparse_matrices_are_bitmaps_and_too_dense_ones_are_stored_dense(toy):
    dst, src = toy
    m = json.loads((dst / MANIFEST).read_text())
    enc = {n: e["encoding"] for n, e in m["tensors"].items()}
    assert enc["model.layers.0.mlp.up_proj.weight"] == "bitmap"
    assert enc["model.layers.0.self_attn.q_proj.weight"] == "bitmap"
    assert enc["model.layers.0.mlp.down_proj.weight"] == "dense"  # 3% sparse: a bitmap would be larger
    assert enc["model.layers.0.input_layernorm.weight"] == "dense"
    dense = m["tensors"]["model.layers.0.mlp.down_proj.weight"]
    assert list(dense["parts"]) == ["dense"] and dense["parts"]["dense"]["name"] == "model.layers.0.mlp.down_proj.weight"
    up = m["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert {p["name"] for p in up["parts"].values()} == {f"model.layers.0.mlp.up_proj.{s}" for s in
                                                         ("shape", "compressed", "bitmask", "row_offsets", "block_offsets")}
    assert up["nnz"] == 48 * 1100 // 2 and up["layer"] == 0 and up["dtype"] == "bfloat16"
    assert isinstance(open_checkpoint(dst).stored("model.layers.0.mlp.up_proj.weight"), BitmapTensor)


def test_sparsity_threshold_for_the_dense_fallback_is_about_one_sixteenth():
    w = pruned(256, 1024, torch.bfloat16, 0.05, seed=1)
    assert prepare("w", w, sparse=True).encoding == "dense"
    assert prepare("w", pruned(256, 1024, torch.bfloat16, 0.08, seed=1), sparse=True).encoding == "bitmap"
    assert prepare("w", pruned(256, 1024, torch.bfloat16, 0.9, seed=1), sparse=False).encoding == "dense"


def test_layer_files_are_safetensors_whose_tensors_equal_the_parts(toy):
    dst, _ = toy
    ckpt = open_checkpoint(dst)
    for rel in ckpt.files:
        loaded = load_file(dst / rel)
        with safetensors.safe_open(dst / rel, framework="pt") as f:
            assert f.metadata() == {"format": "sparseferry", "format_version": "1"}
        names = [n for n, t in ckpt.tensors.items() if t.file == rel]
        expected = {}
        for n in names:
            s = ckpt.stored(n)
            for part, t in (s.parts() if isinstance(s, BitmapTensor) else {"dense": s}).items():
                expected[ckpt.tensors[n].parts[part]["name"]] = t
        assert set(loaded) == set(expected)
        for k, t in expected.items():
            assert_bit_equal(loaded[k], t, k)


def test_layer_file_layout_is_aligned_sorted_and_one_contiguous_range(toy):
    dst, _ = toy
    m = json.loads((dst / MANIFEST).read_text())
    for rel, fe in m["files"].items():
        data_start, header = header_of(dst / rel)
        assert data_start % 8 == 0 and fe["data_start"] == data_start
        assert fe["size"] == fe["data_end"] == (dst / rel).stat().st_size
        items = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
        # by decreasing element size, then by name; each aligned to its element size; no gaps
        assert [k for k, _ in items] == [k for k, _ in sorted(items, key=lambda kv: (-_ELEM[kv[1]["dtype"]], kv[0]))]
        pos = 0
        for k, v in items:
            a, b = v["data_offsets"]
            assert a == pos and a % _ELEM[v["dtype"]] == 0, k
            pos = b
        assert data_start + pos == fe["size"]


def test_golden_layer_file_bytes(tmp_path):
    """The whole layer file of the Golden bytes matrix (docs/FORMAT.md), byte for byte."""
    w = torch.tensor([[1, 0, 0, -2, 0, 0, 0, 0, 3, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 4]], dtype=torch.bfloat16)
    dst = tmp_path / "golden"
    with CheckpointWriter(dst, config={}, architecture="Toy", layers_prefix="model.layers", num_layers=1) as cw:
        # from_bitmap: stored as a bitmap although, this small, the dense bytes (40) would be fewer (44)
        cw.write_file(layer_file(0), [from_bitmap("model.layers.0.mlp.up_proj.weight", encode(w))], 0)
        cw.commit()
    p = "model.layers.0.mlp.up_proj"
    header = (
        f'{{"{p}.row_offsets":{{"dtype":"I64","shape":[2],"data_offsets":[0,16]}},'
        f'"{p}.shape":{{"dtype":"I64","shape":[2],"data_offsets":[16,32]}},'
        f'"{p}.compressed":{{"dtype":"BF16","shape":[4],"data_offsets":[32,40]}},'
        f'"{p}.bitmask":{{"dtype":"U8","shape":[2,2],"data_offsets":[40,44]}},'
        '"__metadata__":{"format":"sparseferry","format_version":"1"}}'
    ).encode()
    header += b" " * (-len(header) % 8)  # pad so that the data starts 8-byte aligned
    data = bytes.fromhex(
        "0000000000000000 0300000000000000"  # row_offsets [0, 3]
        "0200000000000000 0a00000000000000"  # shape [2, 10]
        "803f 00c0 4040 8040"                # compressed bf16 [1, -2, 3, 4]
        "0901 0002"                          # bitmask
    )
    assert (dst / layer_file(0)).read_bytes() == struct.pack("<Q", len(header)) + header + data


def test_manifest_records_what_the_spec_lists(toy):
    dst, _ = toy
    m = json.loads((dst / MANIFEST).read_text())
    assert m["format"] == "sparseferry" and m["format_version"] == 1 and m["block_cols"] == 1024
    assert m["checksum"] == "xxh3_64" and m["num_layers"] == 2 and m["layers_prefix"] == "model.layers"
    assert set(m["files"]) == {layer_file(0), layer_file(1), EXTRA_FILE}
    assert json.loads((dst / "config.json").read_text()) == m["config"] == {"model_type": "toy"}
    ckpt = open_checkpoint(dst)
    assert sorted(ckpt.layer_tensors(1)) == sorted(n for n in m["tensors"] if n.startswith("model.layers.1."))
    assert sorted(ckpt.non_layer_tensors()) == ["model.embed_tokens.weight", "model.norm.weight"]


# ----------------------------------------------------------------------------------------------
# Whole layers by direct reads


def o_direct_works(folder: Path) -> bool:
    probe = folder / ".probe"
    probe.write_bytes(b"\0" * 4096)
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.mark.parametrize("direct", [True, False])
def test_read_layer_into_an_aligned_buffer_returns_what_stored_returns(toy, direct):
    dst, _ = toy
    ckpt = open_checkpoint(dst)
    size = max(buffer_size_for(s, e) for _, s, e in (ckpt.layer_range(i) for i in range(ckpt.num_layers)))
    buf = aligned_empty(size)
    assert buf.data_ptr() % 4096 == 0
    for i in range(ckpt.num_layers):
        with ckpt.open_reader(i, direct=direct) as reader:
            if direct and o_direct_works(dst):
                assert reader.direct  # the bytes came from the disk, not from the page cache
            got = ckpt.read_layer(i, buf, reader=reader, verify=True)
        assert sorted(got) == sorted(ckpt.layer_tensors(i))
        for name, s in got.items():
            assert_same_stored(s, ckpt.stored(name), name)
    # without a reader of its own: read_layer opens and closes one
    got = ckpt.read_layer(1, buf, direct=direct)
    assert_same_stored(got["model.layers.1.mlp.up_proj.weight"], ckpt.stored("model.layers.1.mlp.up_proj.weight"), "up")


def test_a_reused_reader_reads_any_range_of_its_file(tmp_path):
    path = tmp_path / "bytes"
    payload = bytes(range(256)) * 50  # 12800 bytes, not a multiple of 4096
    path.write_bytes(payload)
    buf = aligned_empty(buffer_size_for(0, len(payload)))
    with FileReader(path, direct=True) as r:
        for start, end in [(0, 1), (1, 4097), (4095, 12800), (8192, 12800), (0, 12800)]:
            assert r.read_range(start, end, buf).numpy().tobytes() == payload[start:end]
        with pytest.raises(OSError, match="truncated"):
            r.read_range(0, 12801, buf)



def test_a_parallel_direct_read_returns_the_same_bytes_with_depth_requests_in_flight(tmp_path, monkeypatch):
    """A read larger than one chunk is split into aligned chunks read concurrently (never more than
    `depth` at once); the bytes, the end-of-file tail and the truncation error are the single read's."""
    path = tmp_path / "bytes"
    payload = torch.randint(0, 256, (10 * 4096 + 123,), dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(payload)
    buf = aligned_empty(buffer_size_for(0, len(payload)))
    in_flight, peak, lock = [0], [0], threading.Lock()
    single = sf_io._readinto_all

    def counting(fd, mv, offset):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.02)
        try:
            return single(fd, mv, offset)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(sf_io, "_readinto_all", counting)
    with FileReader(path, direct=True, depth=3, chunk=4096) as r:
        for start, end in [(0, len(payload)), (1, 4097), (4095, 3 * 4096 + 1), (5000, len(payload)), (0, 1)]:
            assert r.read_range(start, end, buf).numpy().tobytes() == payload[start:end], (start, end)
        with pytest.raises(OSError, match="truncated"):
            r.read_range(0, len(payload) + 1, buf)
    if r.direct:  # O_DIRECT refused (tmpfs): one buffered read, nothing to split
        assert 2 <= peak[0] <= 3
    with pytest.raises(ValueError, match="chunk"):
        FileReader(path, depth=2, chunk=1000)


def test_a_read_is_split_into_equal_chunks_a_multiple_of_depth_in_number():
    """All `depth` requests stay in flight to the end of a read: no lone straggler chunk."""
    for n_pages in (1, 2, 3, 7, 8, 9, 100, 257, 1000, 12345):
        n = n_pages * 4096
        for depth, chunk in ((1, 4096), (3, 4096), (4, 4 << 20), (8, 1 << 20), (8, 4 << 20), (16, 256 << 10)):
            size, count = sf_io.split_read(n, depth, chunk)
            assert size % 4096 == 0 and size <= max(chunk, n if depth == 1 else chunk) or count == 1, (n, depth, chunk)
            assert (count - 1) * size < n <= count * size, (n, depth, chunk)
            if depth > 1 and n > chunk:
                assert size <= chunk
                waves = -(-n // (depth * chunk))
                assert count <= waves * depth and count > (waves - 1) * depth, (n, depth, chunk)


def test_submitted_reads_are_in_flight_together_and_land_whole(tmp_path, monkeypatch):
    """`submit` returns before the bytes land, so a second read queues behind the first instead of
    waiting for it; each result is exactly its range, and waiting twice is harmless."""
    path = tmp_path / "bytes"
    payload = torch.randint(0, 256, (16 * 4096 + 99,), dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(payload)
    single, delay = sf_io._readinto_all, 0.05

    def slow(fd, mv, offset):
        time.sleep(delay)
        return single(fd, mv, offset)

    monkeypatch.setattr(sf_io, "_readinto_all", slow)
    with FileReader(path, direct=True, depth=4, chunk=4096) as r:
        if not r.direct:
            pytest.skip("O_DIRECT refused on this filesystem: reads are buffered and immediate")
        bufs = [aligned_empty(buffer_size_for(0, len(payload))) for _ in range(2)]
        t0 = time.perf_counter()
        first = r.submit(0, 8 * 4096 + 5, bufs[0])
        second = r.submit(8 * 4096 + 5, len(payload), bufs[1])
        assert time.perf_counter() - t0 < delay  # neither waited for its bytes
        assert second.result().numpy().tobytes() == payload[8 * 4096 + 5 :]
        assert first.result().numpy().tobytes() == payload[: 8 * 4096 + 5] and first.done()
        assert first.result().numpy().tobytes() == payload[: 8 * 4096 + 5]
        assert first.submitted <= first.finished and second.finished >= first.submitted
        with pytest.raises(OSError, match="truncated"):
            r.submit(0, len(payload) + 1, bufs[0])

# ----------------------------------------------------------------------------------------------
# Writing never leaves a half checkpoint


def test_a_failed_write_leaves_nothing(tmp_path):
    layers, extra = toy_tensors()
    dst = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(dst, config={}, architecture="Toy", layers_prefix="model.layers", num_layers=2) as w:
            w.write_file(layer_file(0), [prepare(n, t, sparse=True) for n, t in layers[0].items()], 0)
            raise RuntimeError("boom")
    assert_nothing_written(dst)


def test_an_existing_destination_is_refused_without_force(toy):
    dst, _ = toy
    layers, extra = toy_tensors()
    with pytest.raises(CheckpointError, match=rf"{dst}: already exists"):
        write_checkpoint(dst, layers, extra)
    assert leftovers(dst) == []


def test_force_replaces_the_destination_only_once_the_new_one_is_complete(toy):
    dst, src = toy
    layers, extra = toy_tensors(num_layers=1)
    with CheckpointWriter(dst, config={}, architecture="Toy", layers_prefix="model.layers", num_layers=1, force=True) as w:
        w.write_file(layer_file(0), [prepare(n, t, sparse=True) for n, t in layers[0].items()], 0)
        assert open_checkpoint(dst).num_layers == 2  # the old one is untouched while the new one is written
        w.commit()
    assert open_checkpoint(dst).num_layers == 1
    assert leftovers(dst) == []


@pytest.mark.parametrize("limit,where", [(2000, "layers/layer-00000.safetensors"), (60_000, MANIFEST)])
def test_a_full_disk_gives_a_clear_error_and_leaves_nothing(tmp_path, limit, where):
    w = pruned(128, 256, torch.bfloat16, 0.5, seed=0)  # a 38 KB layer file; the manifest is > 70 KB
    dst = tmp_path / "ckpt"
    with file_size_limit(limit):
        with pytest.raises(CheckpointError, match=rf"{dst}: out of disk space while writing {where} .*nothing was written"):
            with CheckpointWriter(dst, config={"pad": "x" * 70_000}, architecture="Toy", layers_prefix="model.layers",
                                  num_layers=1) as cw:
                cw.write_file(layer_file(0), [prepare("model.layers.0.w.weight", w, sparse=True)], 0)
                cw.commit()
    assert_nothing_written(dst)


# ----------------------------------------------------------------------------------------------
# What a reader must reject (FORMAT.md section 4), each naming the file and tensor


def edit_manifest(dst: Path, edit) -> None:
    m = json.loads((dst / MANIFEST).read_text())
    edit(m)
    (dst / MANIFEST).write_text(json.dumps(seal(m)))


def test_a_model_folder_without_manifest_gets_a_hint_to_convert(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"not a sparseferry checkpoint, no sparseferry.json .*run `sparseferry convert`"):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such folder"):
        open_checkpoint(tmp_path / "nowhere")


def test_a_manifest_that_is_not_json_is_rejected(toy):
    dst, _ = toy
    (dst / MANIFEST).write_text('{"format": "sparseferry",')
    with pytest.raises(CheckpointError, match=rf"{dst / MANIFEST}: not valid JSON"):
        open_checkpoint(dst)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(format="gguf"), "not a sparseferry manifest"),
    (lambda m: m.update(format_version=2), "format version 2 is newer than this sparseferry reads"),
    (lambda m: m.pop("tensors"), "manifest lacks 'tensors'"),
    (lambda m: m.update(block_cols=512), "block_cols 512 unsupported"),
    (lambda m: m["tensors"]["model.norm.weight"].pop("dtype"), "tensor model.norm.weight: entry lacks 'dtype'"),
    (lambda m: m["files"].pop(EXTRA_FILE), "tensor model.embed_tokens.weight lives in 'extra.safetensors', which the manifest does not list"),
])
def test_a_bad_manifest_is_rejected_on_open(toy, edit, message):
    dst, _ = toy
    edit_manifest(dst, edit)
    with pytest.raises(CheckpointError, match=message) as e:
        open_checkpoint(dst)
    assert str(dst) in str(e.value)


def test_a_missing_file_is_named(toy):
    dst, _ = toy
    (dst / layer_file(1)).unlink()
    with pytest.raises(CheckpointError, match=rf"{dst / layer_file(1)}: listed in the manifest but missing"):
        open_checkpoint(dst)


@pytest.mark.parametrize("change", ["truncate", "append"])
def test_a_file_of_the_wrong_size_is_named(toy, change):
    dst, _ = toy
    path = dst / layer_file(0)
    data = path.read_bytes()
    path.write_bytes(data[:-100] if change == "truncate" else data + b"\0")
    with pytest.raises(CheckpointError, match=rf"{path}: {len(data) + (-100 if change == 'truncate' else 1)} bytes, "
                                              rf"manifest says {len(data)} \(truncated or modified\)"):
        open_checkpoint(dst)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupt_weights_are_caught_naming_the_file_and_the_tensor(toy):
    dst, _ = toy
    ckpt = open_checkpoint(dst)
    part = ckpt.tensors["model.layers.1.mlp.up_proj.weight"].parts["compressed"]
    path = dst / layer_file(1)
    flip_byte(path, part["offset"] + 7)
    ckpt = open_checkpoint(dst)  # sizes unchanged: opening succeeds, reading with verify does not
    pattern = rf"{path}: checksum mismatch .*model\.layers\.1\.mlp\.up_proj\.compressed"
    with pytest.raises(CheckpointError, match=pattern):
        ckpt.verify()
    start, end = ckpt.layer_range(1)[1:]
    with pytest.raises(CheckpointError, match=pattern + ".*refusing to compute on corrupt weights"):
        ckpt.read_layer(1, aligned_empty(buffer_size_for(start, end)), verify=True)
    with pytest.raises(CheckpointError, match=pattern):
        ckpt.load("model.layers.1.mlp.up_proj.weight", verify=True)
    ckpt.read_layer(0, aligned_empty(buffer_size_for(*ckpt.layer_range(0)[1:])), verify=True)  # layer 0 is fine


def rename_in_header(path: Path, old: str, new: str) -> None:
    """Rewrite a name in a safetensors header in place (same length: sizes and data digests unchanged)."""
    assert len(old) == len(new)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    assert data[8:8 + n].count(old.encode()) == 1
    path.write_bytes(data[:8] + data[8:8 + n].replace(old.encode(), new.encode()) + data[8 + n:])


def reseal_header(dst: Path, rel: str) -> None:
    """Record a rewritten header's digest in the manifest (and reseal it): a forger's next step."""
    m = json.loads((dst / MANIFEST).read_text())
    m["files"][rel]["header_digest"] = xxhash.xxh3_64_hexdigest((dst / rel).read_bytes()[: m["files"][rel]["data_start"]])
    (dst / MANIFEST).write_text(json.dumps(seal(m)))


def test_a_rewritten_header_is_refused_on_open(toy):
    dst, _ = toy
    path = dst / layer_file(0)
    rename_in_header(path, "q_proj.bitmask", "q_proj.bitmasq")
    with pytest.raises(CheckpointError, match=rf"{path}: header digest mismatch"):
        open_checkpoint(dst)


def test_a_tensor_missing_from_the_file_header_is_refused_on_open(toy):
    dst, _ = toy
    path = dst / layer_file(0)
    rename_in_header(path, "q_proj.bitmask", "q_proj.bitmasq")
    reseal_header(dst, layer_file(0))
    with pytest.raises(CheckpointError, match=rf"{path}: tensor model\.layers\.0\.self_attn\.q_proj\.weight, part bitmask: "
                                              r"the safetensors header has model\.layers\.0\.self_attn\.q_proj\.bitmask as None"):
        open_checkpoint(dst)


def test_a_header_disagreeing_with_the_manifest_is_refused_on_open(toy):
    dst, _ = toy
    path = dst / layer_file(0)
    rename_in_header(path, '"dtype":"BF16","shape":[40]', '"dtype":"F16","shape":[40] ')
    reseal_header(dst, layer_file(0))
    with pytest.raises(CheckpointError, match=rf"{path}: tensor model\.layers\.0\.input_layernorm\.weight, part dense: "
                                              r"the safetensors header has .* as .*'F16'.* manifest says .*'BF16'"):
        open_checkpoint(dst)


def test_a_bitmask_whose_bit_count_differs_from_the_values_fails_verify(tmp_path):
    bt = encode(pruned(8, 64, torch.bfloat16, 0.5, seed=0))
    bt.bitmask[0, 0] ^= 1  # one position more or less than there are values
    with CheckpointWriter(tmp_path / "bad", config={}, architecture="Toy", layers_prefix="model.layers", num_layers=1) as w:
        w.write_file(layer_file(0), [from_bitmap("model.layers.0.w.weight", bt)], 0)
        w.commit()
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'bad' / layer_file(0)}: tensor model\.layers\.0\.w\.weight: "
                                              r".*the bitmask has \d+ set bits, 256 values are stored"):
        open_checkpoint(tmp_path / "bad").verify()


def test_row_offsets_that_disagree_with_the_bitmask_fail_verify(tmp_path):
    bt = encode(pruned(8, 64, torch.bfloat16, 0.5, seed=0))
    bt.row_offsets[3] += 1  # the set-bit total still matches: only the per-row spans are wrong
    with CheckpointWriter(tmp_path / "bad", config={}, architecture="Toy", layers_prefix="model.layers", num_layers=1) as w:
        w.write_file(layer_file(0), [from_bitmap("model.layers.0.w.weight", bt)], 0)
        w.commit()
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.w\.weight: .*row 3 starts at value \d+, its set bits say"):
        open_checkpoint(tmp_path / "bad").verify()


def test_an_unknown_tensor_name_is_named(toy):
    dst, _ = toy
    with pytest.raises(CheckpointError, match=r"no tensor 'lm_head.weight' in this checkpoint"):
        open_checkpoint(dst).load("lm_head.weight")


def test_disk_full_errnos_are_the_ones_translated():
    # ENOSPC (disk full), EFBIG (file too large, what RLIMIT_FSIZE produces), EDQUOT (quota)
    from sparseferry.store import _DISK_FULL

    assert set(_DISK_FULL) == {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def test_a_filesystem_refusing_a_direct_read_falls_back_to_buffered_reads_for_good(tmp_path, monkeypatch):
    """O_DIRECT accepted at open but a read refused with EINVAL (some filesystems): the same bytes come
    back through buffered reads from then on, and the direct descriptor is closed with the reader."""
    import errno

    path = tmp_path / "bytes"
    payload = torch.randint(0, 256, (12 * 4096 + 7,), dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(payload)
    single = sf_io._readinto_all
    refused: set[int] = set()

    def refusing(fd, mv, offset):
        if fd in refused:
            raise OSError(errno.EINVAL, "Invalid argument")
        return single(fd, mv, offset)

    buf = aligned_empty(buffer_size_for(0, len(payload)))
    with FileReader(path, direct=True, depth=4, chunk=4096) as r:
        if not r.direct:
            pytest.skip("O_DIRECT refused at open on this filesystem")
        direct_fd = r.fd
        refused.add(direct_fd)
        monkeypatch.setattr(sf_io, "_readinto_all", refusing)
        for start, end in [(0, len(payload)), (5, 4099), (0, 1)]:  # a split read, then single ones
            assert r.read_range(start, end, buf).numpy().tobytes() == payload[start:end]
            assert not r.direct and r.fd != direct_fd
    link = f"/proc/self/fd/{direct_fd}"  # closed with the reader (the number may since name another file)
    assert not os.path.exists(link) or os.readlink(link) != str(path)
