"""`sparseferry convert`, end to end on tiny random-weight models: what goes in comes out, bit for bit."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    ARCHS,
    assert_bit_equal,
    assert_nothing_written,
    file_size_limit,
    leftovers,
    linear_modules,
    make_tiny_model,
    read_json,
    tied_weights,
)
from safetensors.torch import load_file, save_file

from sparseferry.convert import ConvertError, convert
from sparseferry.errors import SparseferryError
from sparseferry.format import BitmapTensor
from sparseferry.hf import ModelError
from sparseferry.store import MANIFEST, CheckpointError, open_checkpoint

COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def layer_linear_weights(model) -> set[str]:
    """State-dict names of the linear weights inside the decoder layers (what the converter encodes)."""
    return {f"{n}.weight" for n in linear_modules(model) if ".layers." in n or ".h." in n}


def assert_checkpoint_holds(dst: Path, model, dtype: torch.dtype | None = None) -> None:
    """Every parameter of `model` loads from the checkpoint bit for bit (after a cast to `dtype`)."""
    ckpt = open_checkpoint(dst)
    for name, t in model.state_dict().items():
        stored_as = ckpt.tied.get(name, name)
        want = t if dtype is None or not t.is_floating_point() else t.to(dtype)
        assert_bit_equal(ckpt.load(stored_as), want, name)


def rewrite_weights(folder: Path, edit) -> None:
    """Apply `edit(dict of tensors)` to the single model.safetensors of `folder`."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# Round trip


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_comes_back_bit_for_bit(tmp_path, arch):
    src, model = make_tiny_model(arch, tmp_path)
    stats = convert(src, tmp_path / "out", progress=False)
    assert_checkpoint_holds(tmp_path / "out", model)
    ckpt = open_checkpoint(tmp_path / "out")
    for name in layer_linear_weights(model):  # pruned to 50%: stored as bitmaps of exactly half the values
        e = ckpt.tensors[name]
        assert (e.encoding, e.nnz) == ("bitmap", model.state_dict()[name].numel() // 2), name
    assert stats["tensors"] == len(ckpt.tensors)
    assert (stats["dense_bytes"], stats["stored_bytes"]) == (ckpt.dense_bytes(), ckpt.stored_bytes())
    ckpt.verify()


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_tied_lm_head_is_stored_once(tmp_path, arch):
    src, model = make_tiny_model(arch, tmp_path)
    convert(src, tmp_path / "out", progress=False)
    ckpt = open_checkpoint(tmp_path / "out")
    assert tied_weights(model) == ckpt.tied  # {"lm_head.weight": the input embeddings}
    assert "lm_head.weight" not in ckpt.tensors
    assert_bit_equal(ckpt.load(ckpt.tied["lm_head.weight"]), model.lm_head.weight, "lm_head.weight")


def test_gpt2_conv1d_weights_keep_their_transposed_shape(tmp_path):
    src, model = make_tiny_model("gpt2", tmp_path)
    convert(src, tmp_path / "out", progress=False)
    e = open_checkpoint(tmp_path / "out").tensors["transformer.h.0.mlp.c_fc.weight"]
    assert e.shape == (64, 256) == tuple(model.transformer.h[0].mlp.c_fc.weight.shape)  # [in, out]
    assert e.encoding == "bitmap"


def test_tokenizer_and_other_small_files_are_copied_and_config_kept(tmp_path):
    src, model = make_tiny_model("llama", tmp_path)
    (src / "README.md").write_text("a model card")
    convert(src, tmp_path / "out", progress=False)
    dst = tmp_path / "out"
    for name in COPIED + ("README.md",):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert read_json(dst / "config.json") == read_json(src / "config.json") == read_json(dst / MANIFEST)["config"]
    assert not list(dst.glob("*.safetensors.index.json")) and not (dst / "model.safetensors").exists()


@pytest.fixture(scope="module")
def wide_checkpoints(tmp_path_factory):
    """Llama and OPT one-layer models 1536 wide: the 12-16 offset bytes per row of 1536 columns cost
    0.52% of the dense bytes (the bound allows 0.5625%; rows narrower than ~1420 columns exceed it)."""
    tmp = tmp_path_factory.mktemp("wide")
    out = {}
    for arch, kw in (("llama", {"intermediate_size": 1536, "num_key_value_heads": 1}), ("opt", {"ffn_dim": 1536})):
        src, model = make_tiny_model(arch, tmp, hidden=1536, layers=1, tokenizer=False, **kw)
        convert(src, tmp / f"{arch}-sf", progress=False)
        out[arch] = (tmp / f"{arch}-sf", layer_linear_weights(model))
    return out


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_half_sparse_layer_weights_take_at_most_0_5625_of_dense_plus_1_percent(wide_checkpoints, arch):
    dst, names = wide_checkpoints[arch]
    ckpt = open_checkpoint(dst)
    assert len(names) >= 6
    assert ckpt.stored_bytes(names) <= (0.5625 + 0.01) * ckpt.dense_bytes(names)
    for n in names:  # and each matrix on its own
        assert ckpt.tensors[n].stored_bytes <= (0.5625 + 0.01) * ckpt.tensors[n].dense_bytes, n


def test_sharded_sources_convert(tmp_path):
    src, model = make_tiny_model("llama", tmp_path, max_shard_size="60KB")
    assert len(list(src.glob("model-*-of-*.safetensors"))) > 2 and (src / "model.safetensors.index.json").exists()
    convert(src, tmp_path / "out", progress=False)
    assert_checkpoint_holds(tmp_path / "out", model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pytorch_bin_sources_convert(tmp_path, arch):
    src, model = make_tiny_model(arch, tmp_path, weights="bin")
    assert (src / "pytorch_model.bin").exists() and not list(src.glob("*.safetensors"))
    convert(src, tmp_path / "out", progress=False)
    assert_checkpoint_holds(tmp_path / "out", model)
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()


def test_dtype_cast_converts_every_floating_parameter(tmp_path):
    src, model = make_tiny_model("llama", tmp_path, dtype=torch.float32)
    convert(src, tmp_path / "out", dtype="float16", progress=False)
    assert_checkpoint_holds(tmp_path / "out", model, dtype=torch.float16)
    assert read_json(tmp_path / "out" / "config.json")["dtype"] == "float16"


# ----------------------------------------------------------------------------------------------
# compressed-tensors "sparse-bitmask" checkpoints


def write_sparse_bitmask_checkpoint(folder: Path, model, quantization_format: str = "dense") -> None:
    """A compressed-tensors sparse-bitmask checkpoint of `model`, built with numpy, not with sparseferry."""
    folder.mkdir()
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": quantization_format,
        "sparsity_config": {"format": "sparse-bitmask", "global_sparsity": 0.5, "sparsity_structure": "unstructured",
                            "targets": ["Linear"], "ignore": ["lm_head"]},
    }
    if quantization_format != "dense":
        config["quantization_config"]["config_groups"] = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4}}}
    (folder / "config.json").write_text(json.dumps(config))
    encoded = layer_linear_weights(model)
    tensors = {}
    for name, w in model.state_dict().items():
        if name not in encoded:
            tensors[name] = w.contiguous()
            continue
        p = name.removesuffix(".weight")
        b = w.contiguous().view(torch.int16).numpy()  # bf16 bit patterns
        nonzero = (b & 0x7FFF) != 0
        tensors[f"{p}.shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
        tensors[f"{p}.compressed"] = torch.from_numpy(b[nonzero].copy()).view(torch.bfloat16)
        tensors[f"{p}.bitmask"] = torch.from_numpy(np.packbits(nonzero, axis=-1, bitorder="little"))
        tensors[f"{p}.row_offsets"] = torch.from_numpy(np.concatenate([[0], np.cumsum(nonzero.sum(1))[:-1]]).astype(np.int64))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "compressed"})


def test_compressed_tensors_sparse_bitmask_imports_bit_exactly(tmp_path):
    _, model = make_tiny_model("llama", tmp_path, tokenizer=False)
    src = tmp_path / "ct"
    write_sparse_bitmask_checkpoint(src, model)
    convert(src, tmp_path / "out", progress=False)
    assert_checkpoint_holds(tmp_path / "out", model)
    ckpt = open_checkpoint(tmp_path / "out")
    theirs = load_file(src / "model.safetensors")
    for name in layer_linear_weights(model):
        bt = ckpt.stored(name)
        assert isinstance(bt, BitmapTensor)
        p = name.removesuffix(".weight")
        for part in ("compressed", "bitmask", "row_offsets", "shape"):  # taken as they are
            assert_bit_equal(bt.parts()[part], theirs[f"{p}.{part}"], f"{p}.{part}")
    out_config = read_json(tmp_path / "out" / "config.json")
    assert "quantization_config" not in out_config and "quantization_config" not in ckpt.config
    assert ckpt.manifest["source"]["compressed_tensors"] is True
    ckpt.verify()


def test_quantized_compressed_tensors_checkpoints_are_refused(tmp_path):
    _, model = make_tiny_model("llama", tmp_path, tokenizer=False)
    write_sparse_bitmask_checkpoint(tmp_path / "ct", model, quantization_format="pack-quantized")
    with pytest.raises(ConvertError, match=r"quantized \(format 'pack-quantized'\)"):
        convert(tmp_path / "ct", tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# Bad input: a one-line error naming the file and tensor, and nothing written


def test_a_folder_without_config_is_refused(tmp_path):
    src, _ = make_tiny_model("llama", tmp_path)
    (src / "config.json").unlink()
    with pytest.raises(ModelError, match=rf"{src}: no config.json"):
        convert(src, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_a_folder_without_weights_is_refused(tmp_path):
    src, _ = make_tiny_model("llama", tmp_path)
    (src / "model.safetensors").unlink()
    with pytest.raises(ConvertError, match=rf"{src}: no weights \(\*.safetensors or \*.bin\) found"):
        convert(src, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_a_missing_parameter_is_named(tmp_path):
    src, _ = make_tiny_model("llama", tmp_path)
    rewrite_weights(src, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ConvertError, match=rf"{src}: weights missing for model\.layers\.1\.mlp\.down_proj\.weight"):
        convert(src, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_integer_linear_weights_are_refused_naming_file_and_tensor(tmp_path):
    src, _ = make_tiny_model("llama", tmp_path)
    name = "model.layers.1.self_attn.v_proj.weight"
    rewrite_weights(src, lambda t: t.update({name: torch.ones(32, 64, dtype=torch.int8)}))
    with pytest.raises(ConvertError, match=rf"{src / 'model.safetensors'}: tensor {name} has dtype torch.int8; "
                                           r"expected bfloat16, float16 or float32 \(integer \(quantized\) weights"):
        convert(src, tmp_path / "out", dtype="bfloat16", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_float64_linear_weights_need_an_explicit_cast(tmp_path):
    src, model = make_tiny_model("llama", tmp_path, dtype=torch.float64)
    with pytest.raises(ConvertError, match=rf"{src / 'model.safetensors'}: tensor model\.layers\.0\.\S+\.weight has "
                                           r"dtype torch.float64; .*use --dtype bfloat16, float16 or float32 to cast"):
        convert(src, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")
    convert(src, tmp_path / "out", dtype="float32", progress=False)
    assert_checkpoint_holds(tmp_path / "out", model, dtype=torch.float32)


@pytest.mark.parametrize("cut", ["data", "header"])
def test_a_truncated_shard_is_named(tmp_path, cut):
    src, _ = make_tiny_model("llama", tmp_path, max_shard_size="60KB")
    shard = sorted(src.glob("model-*-of-*.safetensors"))[1]
    data = shard.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    shard.write_bytes(data[: len(data) - 1000] if cut == "data" else data[: 8 + header_len // 2])
    with pytest.raises(ConvertError, match=rf"{shard}: (truncated or corrupted|not a readable safetensors file)"):
        convert(src, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_a_truncated_bin_is_named(tmp_path):
    src, _ = make_tiny_model("llama", tmp_path, weights="bin")
    path = src / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ConvertError, match=rf"{path}: cannot be read as a PyTorch state dict"):
        convert(src, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_an_existing_destination_is_kept_unless_forced(tmp_path):
    src, model = make_tiny_model("llama", tmp_path)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "precious").write_text("keep me")
    with pytest.raises(CheckpointError, match=rf"{dst}: already exists \(pass --force"):
        convert(src, dst, progress=False)
    assert (dst / "precious").read_text() == "keep me"
    with pytest.raises(CheckpointError, match=rf"{dst}: holds precious, not a sparseferry output"):
        convert(src, dst, force=True, progress=False)  # --force replaces only our own outputs
    assert (dst / "precious").read_text() == "keep me"
    (dst / "precious").unlink()
    convert(src, dst, progress=False, force=True)  # an empty folder
    convert(src, dst, force=True, progress=False)  # a previous checkpoint
    assert leftovers(dst) == []
    assert_checkpoint_holds(dst, model)


def test_force_keeps_the_old_checkpoint_when_the_new_one_fails(tmp_path):
    good, model = make_tiny_model("llama", tmp_path, name="good")
    bad, _ = make_tiny_model("llama", tmp_path, name="bad", seed=1)
    rewrite_weights(bad, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.ones(128, 64, dtype=torch.int8)}))
    dst = tmp_path / "out"
    convert(good, dst, progress=False)
    with pytest.raises(ConvertError, match="model.layers.1.mlp.up_proj.weight has dtype torch.int8"):
        convert(bad, dst, force=True, progress=False)
    assert leftovers(dst) == []
    assert_checkpoint_holds(dst, model)


@pytest.mark.parametrize("where", ["layers/layer-00000.safetensors", "extra.safetensors", "merges.txt"])
def test_a_full_disk_gives_a_clear_error_and_leaves_nothing(tmp_path, where):
    src, _ = make_tiny_model("llama", tmp_path)
    (src / "merges.txt").write_text("a b\n" * 50_000)  # 200 KB, the largest file
    convert(src, tmp_path / "ok", progress=False)
    sizes = {p.relative_to(tmp_path / "ok").as_posix(): p.stat().st_size for p in (tmp_path / "ok").rglob("*") if p.is_file()}
    # files in the order convert writes them: layers, extra, copies (by name), config, manifest
    order = ["layers/layer-00000.safetensors", "layers/layer-00001.safetensors", "extra.safetensors",
             "generation_config.json", "merges.txt"]
    limit = sizes[where] - 1  # `where` cannot be written whole, every file before it can
    assert all(sizes[n] <= limit for n in order[: order.index(where)])
    dst = tmp_path / "out"
    with file_size_limit(limit):
        with pytest.raises(CheckpointError, match=rf"{dst}: out of disk space while writing {where} \(File too large\); "
                                                  "nothing was written"):
            convert(src, dst, progress=False)
    assert_nothing_written(dst)


def test_every_error_is_a_sparseferry_error():
    for cls in (ConvertError, CheckpointError, ModelError):
        assert issubclass(cls, SparseferryError)
