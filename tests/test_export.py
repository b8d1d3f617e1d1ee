"""`sparseferry export`: a checkpoint back out as a plain HuggingFace folder (transformers' logits on it
equal sparseferry's) or as compressed-tensors sparse-bitmask (the real compressed-tensors 0.14.0.1,
installed into a temporary folder, decompresses it bit for bit)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import assert_bit_equal, assert_nothing_written, make_checkpoint, make_tiny_model, read_json
from safetensors import safe_open

import sparseferry
from sparseferry.cli import main
from sparseferry.convert import convert
from sparseferry.errors import SparseferryError
from sparseferry.export import CT_VERSION, ExportError, export
from sparseferry.store import open_checkpoint

IDS = torch.tensor([[256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100], [256, 84, 104, 101, 32, 102, 101, 114, 114, 121, 32, 99, 114]])


def exported_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of an exported folder, read through its index (each key must be where the index says)."""
    index = read_json(folder / "model.safetensors.index.json")
    out = {}
    for key, shard in index["weight_map"].items():
        with safe_open(folder / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            out[key] = f.get_tensor(key)
    files = {p.name for p in folder.glob("*.safetensors")}
    assert files == set(index["weight_map"].values())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    return out


def transformers_logits(folder, dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return m(IDS).logits


def sparseferry_logits(ckpt) -> torch.Tensor:
    model = sparseferry.load(ckpt, resident_form="dense")  # torch's dense matmul, as transformers computes
    try:
        with torch.no_grad():
            return model(IDS).logits
    finally:
        model.sparseferry.close()


# ----------------------------------------------------------------------------------------------
# --to hf


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "opt"])
def test_transformers_logits_on_the_hf_export_equal_sparseferrys(tmp_path, arch):
    ckpt, model = make_checkpoint(arch, tmp_path)
    out = tmp_path / "hf"
    export(ckpt, out, to="hf", progress=False)
    got = transformers_logits(out, torch.bfloat16)
    assert torch.equal(got, sparseferry_logits(ckpt))
    with torch.no_grad():
        assert torch.equal(got, model(IDS).logits)  # and the source model's: the format is lossless


def test_the_hf_export_has_the_source_checkpoints_names_and_files(tmp_path):
    src, model = make_tiny_model("gpt_neox", tmp_path)  # its checkpoints call lm_head "embed_out"
    ckpt = tmp_path / "ckpt"
    convert(src, ckpt, progress=False)
    out = tmp_path / "hf"
    export(ckpt, out, max_shard_size="60KB", progress=False)
    tensors = exported_tensors(out)
    with safe_open(next(src.glob("*.safetensors")), framework="pt") as f:
        source_keys = set(f.keys())
    assert set(tensors) == source_keys
    assert "embed_out.weight" in tensors
    for key, t in tensors.items():
        with safe_open(next(src.glob("*.safetensors")), framework="pt") as f:
            assert_bit_equal(t, f.get_tensor(key), key)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert not (out / "sparseferry.json").exists() and not (out / "layers").exists()
    cfg = read_json(out / "config.json")
    assert cfg["model_type"] == "gpt_neox" and "quantization_config" not in cfg


def test_shards_hold_at_most_max_shard_size_bytes_unless_one_tensor_is_larger(tmp_path):
    ckpt, _ = make_checkpoint("llama", tmp_path)
    out = tmp_path / "hf"
    limit = 40_000
    export(ckpt, out, max_shard_size=limit, progress=False)
    index = read_json(out / "model.safetensors.index.json")
    for shard in set(index["weight_map"].values()):
        with safe_open(out / shard, framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
            nbytes = [2 * (s[0] * (s[1] if len(s) > 1 else 1)) for s in sizes]
        assert sum(nbytes) <= limit or len(nbytes) == 1


def test_quantized_values_export_dequantized(tmp_path):
    src, _ = make_tiny_model("llama", tmp_path)
    ckpt = tmp_path / "ckpt-int8"
    convert(src, ckpt, values="int8", group_size=32, progress=False)
    out = tmp_path / "hf"
    export(ckpt, out, progress=False)
    tensors = exported_tensors(out)
    c = open_checkpoint(ckpt)
    assert c.tensors["model.layers.0.mlp.up_proj.weight"].values == "int8"
    for name in c.tensors:
        assert_bit_equal(tensors[name], c.load(name), name)  # the dequantized values, bf16
    assert torch.equal(transformers_logits(out, torch.bfloat16), sparseferry_logits(ckpt))


def test_dtype_casts_every_floating_tensor_and_the_config(tmp_path):
    ckpt, _ = make_checkpoint("qwen2", tmp_path)
    out = tmp_path / "hf32"
    export(ckpt, out, dtype="float32", progress=False)
    tensors = exported_tensors(out)
    c = open_checkpoint(ckpt)
    for name, t in tensors.items():
        assert t.dtype == torch.float32, name
        assert torch.equal(t, c.load(name).float()), name
    assert read_json(out / "config.json")["dtype"] == "float32"


# ----------------------------------------------------------------------------------------------
# --to compressed-tensors


def test_the_compressed_tensors_export_has_the_sparse_bitmask_layout_and_config(tmp_path):
    ckpt, model = make_checkpoint("llama", tmp_path)
    out = tmp_path / "ct"
    res = export(ckpt, out, to="compressed-tensors", progress=False)
    tensors = exported_tensors(out)
    c = open_checkpoint(ckpt)
    linear = [n for n in c.tensors if c.layers_prefix in n and n.endswith("_proj.weight")]
    assert res["compressed"] == len(linear) > 0
    for n in linear:
        p = n.removesuffix(".weight")
        assert n not in tensors
        rows, cols = c.tensors[n].shape
        assert tensors[f"{p}.shape"].dtype == torch.int64 and tensors[f"{p}.shape"].tolist() == [rows, cols]
        assert tensors[f"{p}.bitmask"].dtype == torch.uint8 and tuple(tensors[f"{p}.bitmask"].shape) == (rows, (cols + 7) // 8)
        assert tensors[f"{p}.row_offsets"].dtype == torch.int64 and tuple(tensors[f"{p}.row_offsets"].shape) == (rows,)
        assert tensors[f"{p}.compressed"].dtype == torch.bfloat16
        assert tensors[f"{p}.compressed"].numel() == int(torch.count_nonzero(c.load(n)))
        assert f"{p}.block_offsets" not in tensors  # ours, not the standard layout
    assert_bit_equal(tensors["model.norm.weight"], c.load("model.norm.weight"))
    qc = read_json(out / "config.json")["quantization_config"]
    assert qc == {"quant_method": "compressed-tensors", "version": CT_VERSION, "transform_config": {},
                  "sparsity_config": {"format": "sparse-bitmask", "targets": ["Linear"], "ignore": ["lm_head"],
                                      "sparsity_structure": "unstructured", "global_sparsity": qc["sparsity_config"]["global_sparsity"]}}
    assert 0.3 < qc["sparsity_config"]["global_sparsity"] < 0.5


def make_2_4_model(tmp_path, arch: str = "llama"):
    """A tiny dense-stored model whose decoder linear weights keep the 2 largest of every 4."""
    src, model = make_tiny_model(arch, tmp_path, sparsity=None, name=f"{arch}-2-4")
    for name, p in model.named_parameters():
        if ".layers." in name and name.endswith("_proj.weight"):
            w = p.data.view(p.shape[0], -1, 4)
            keep = w.abs().topk(2, dim=-1).indices
            mask = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, keep, True)
            p.data.copy_(w.masked_fill(~mask, 0).view_as(p))  # +0.0 where pruned (w * mask gives -0.0)
    model.save_pretrained(src)
    return src, model


def test_a_2_4_checkpoint_says_2_4_in_its_sparsity_config(tmp_path):
    src, _ = make_2_4_model(tmp_path)
    ckpt = tmp_path / "ckpt"
    convert(src, ckpt, progress=False)
    export(ckpt, tmp_path / "ct", to="compressed-tensors", progress=False)
    assert read_json(tmp_path / "ct" / "config.json")["quantization_config"]["sparsity_config"]["sparsity_structure"] == "2:4"


def test_the_compressed_tensors_export_converts_back_bit_exactly(tmp_path):
    ckpt, _ = make_checkpoint("gpt2", tmp_path)  # Conv1D weights, tied head
    export(ckpt, tmp_path / "ct", to="compressed-tensors", progress=False)
    back = tmp_path / "back"
    convert(tmp_path / "ct", back, progress=False)
    a, b = open_checkpoint(ckpt), open_checkpoint(back)
    assert b.manifest["source"]["compressed_tensors"] is True
    assert set(a.tensors) == set(b.tensors)
    for n in a.tensors:
        assert_bit_equal(b.load(n), a.load(n), n)


@pytest.fixture(scope="session")
def compressed_tensors_0_14(tmp_path_factory):
    """compressed-tensors 0.14.0.1 (the last release with sparse compressors) in a folder of its own.

    --no-deps: it would pull transformers < 5; its own imports need only pydantic (installed) and loguru.
    """
    target = tmp_path_factory.mktemp("ct-0.14.0.1")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        f"compressed-tensors=={CT_VERSION}", "loguru"], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"compressed-tensors {CT_VERSION} cannot be installed here: {r.stderr.strip().splitlines()[-1:]}")
    probe = subprocess.run([sys.executable, "-c", "import compressed_tensors.compressors"], env=dict(os.environ, PYTHONPATH=str(target)),
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"compressed-tensors {CT_VERSION} does not import here: {probe.stderr.strip().splitlines()[-1:]}")
    return target


_CT_SCRIPT = """
import json, sys
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
import compressed_tensors
from compressed_tensors.compressors import ModelCompressor, Sparse24BitMaskCompressor
from compressed_tensors.config import Sparse24BitMaskConfig
spec = json.loads(sys.argv[1])
assert compressed_tensors.__version__ == spec["version"], compressed_tensors.__version__
for folder, dst in spec["decompress"]:  # our export, decompressed by compressed-tensors' own code
    mc = ModelCompressor.from_pretrained(folder)
    assert mc.sparsity_config.format == "sparse-bitmask", mc.sparsity_config
    save_file({name: t.contiguous() for name, t in mc.sparsity_compressor.decompress(folder)}, dst)
src, dst, targets = spec["compress24"]  # a dense 2:4 folder, compressed by compressed-tensors' own code
with safe_open(Path(src) / "model.safetensors", framework="pt") as f:
    sd = {k: f.get_tensor(k) for k in f.keys()}
cfg = Sparse24BitMaskConfig(targets=["Linear"], ignore=["lm_head"], sparsity_structure="2:4")
save_file(Sparse24BitMaskCompressor(config=cfg).compress(sd, compression_targets=set(targets)),
          Path(dst) / "model.safetensors", metadata={"format": "pt"})
config = json.loads((Path(src) / "config.json").read_text())
config["quantization_config"] = {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
                                 "sparsity_config": cfg.model_dump(), "transform_config": {}}
(Path(dst) / "config.json").write_text(json.dumps(config))
"""


def test_compressed_tensors_0_14_reads_our_export_and_writes_sparse_24_we_import(tmp_path, compressed_tensors_0_14):
    cases = {}
    for arch in ("llama", "gpt2"):  # nn.Linear and GPT-2's transposed Conv1D
        ckpt, _ = make_checkpoint(arch, tmp_path)
        export(ckpt, tmp_path / f"{arch}-ct", to="compressed-tensors", progress=False)
        cases[arch] = (ckpt, tmp_path / f"{arch}-ct", tmp_path / f"{arch}-decompressed.safetensors")
    src24, model24 = make_2_4_model(tmp_path)
    dst24 = tmp_path / "sparse24"
    dst24.mkdir()
    targets = [n for n, m in model24.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)]
    spec = {"version": CT_VERSION, "decompress": [(str(out), str(dec)) for _, out, dec in cases.values()],
            "compress24": (str(src24), str(dst24), targets)}
    r = subprocess.run([sys.executable, "-c", _CT_SCRIPT, json.dumps(spec)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(compressed_tensors_0_14)), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for arch, (ckpt, _, dec) in cases.items():  # 1. compressed-tensors decompresses our export bit for bit
        c = open_checkpoint(ckpt)
        with safe_open(dec, framework="pt") as f:
            assert set(f.keys()) == set(c.tensors), arch
            for n in c.tensors:
                assert_bit_equal(f.get_tensor(n), c.load(n), f"{arch} {n}")
    with safe_open(dst24 / "model.safetensors", framework="pt") as f:  # 2. its sparse-24-bitmask imports bit for bit
        assert f"{targets[0]}.compressed" in f.keys() and f"{targets[0]}.row_offsets" not in f.keys()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (dst24 / name).write_bytes((src24 / name).read_bytes())
    ckpt24 = tmp_path / "sparse24-sf"
    convert(dst24, ckpt24, progress=False)
    c = open_checkpoint(ckpt24)
    for n, p in model24.state_dict().items():
        if n in c.tensors:
            assert_bit_equal(c.load(n), p, n)


# ----------------------------------------------------------------------------------------------
# Bad input, atomic output, the command line


def test_an_existing_destination_is_kept_unless_forced(tmp_path):
    ckpt, _ = make_checkpoint("llama", tmp_path)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export(ckpt, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    export(ckpt, out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").exists()


def test_a_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    from sparseferry.store import Checkpoint

    ckpt, _ = make_checkpoint("llama", tmp_path)
    calls = {"n": 0}
    real = Checkpoint.stored

    def failing(self, name, *a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise ExportError("injected")
        return real(self, name, *a, **k)

    monkeypatch.setattr(Checkpoint, "stored", failing)
    with pytest.raises(ExportError, match="injected"):
        export(ckpt, tmp_path / "hf", progress=False)
    assert_nothing_written(tmp_path / "hf")


@pytest.mark.parametrize("kwargs,words", [
    (dict(to="gguf"), "choose from hf, compressed-tensors"),
    (dict(dtype="float64"), "choose from bfloat16"),
    (dict(max_shard_size="lots"), "does not parse"),
])
def test_bad_options_are_clear_errors(tmp_path, kwargs, words):
    ckpt, _ = make_checkpoint("llama", tmp_path)
    with pytest.raises(SparseferryError, match=words):
        export(ckpt, tmp_path / "out", progress=False, **kwargs)
    assert_nothing_written(tmp_path / "out")


def test_a_hub_id_is_refused_saying_nothing_is_downloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SparseferryError, match="Hub id.*never downloads"):
        export("HuggingFaceTB/SmolLM2-135M", tmp_path / "out", progress=False)


def test_the_cli_exports_and_warns_about_current_compressed_tensors(tmp_path, capsys):
    ckpt, _ = make_checkpoint("llama", tmp_path)
    assert main(["export", str(ckpt), str(tmp_path / "hf"), "-q"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["export", str(ckpt), str(tmp_path / "ct"), "--to", "compressed-tensors", "-q"]) == 0
    err = capsys.readouterr().err
    assert f"compressed-tensors <= {CT_VERSION}" in err and "random" in err
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "x"), "-q"]) == 1
    assert "no such folder" in capsys.readouterr().err
