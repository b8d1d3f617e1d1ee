"""Mixture-of-experts checkpoints convert with transformers' own conversion mapping, one decoder layer
at a time: every family, published per-expert tensors and already-fused ones, with every expert
matrix bitmap-encoded per expert; and the checkpoint runs with transformers' logits."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_bit_equal, assert_nothing_written, make_tiny_model
from moe_models import FAMILIES, make_tiny_moe, meta_param_count, moe_model_types, tiny_moe_config
from safetensors.torch import load_file, save_file

import sparseferry
from sparseferry.convert import ConvertError, convert
from sparseferry.hf import ModelError, info_from_config_dict
from sparseferry.runtime.budget import BudgetError
from sparseferry.store import open_checkpoint


def assert_holds(dst, model) -> None:
    """Every parameter of `model` comes back from the checkpoint bit for bit."""
    ckpt = open_checkpoint(dst)
    for name, t in model.state_dict().items():
        assert_bit_equal(ckpt.load(ckpt.tied.get(name, name)), t, name)


def assert_experts_stored_per_expert(dst, model) -> None:
    """Each fused expert parameter is an "experts" entry whose 2-D slices are bitmap-encoded."""
    ckpt = open_checkpoint(dst)
    _, _, info = info_from_config_dict(json.loads((dst / "config.json").read_text()))
    assert info.expert_params, "the model has no expert parameters"
    for name, E in info.expert_params.items():
        e = ckpt.tensors[name]
        assert e.encoding == "experts" and e.num_experts == E == ckpt.num_experts(info.layer_of(name)), name
        if len(e.shape) >= 2 and e.experts[0].shape.__len__() == 2:
            assert {sub.encoding for sub in e.experts} == {"bitmap"}, name
    for i in range(ckpt.num_layers):
        assert sorted(ckpt.expert_params(i)) == sorted(n for n in info.expert_params if info.layer_of(n) == i)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def minimum(dst, **kw) -> int:
    with pytest.raises(BudgetError) as e:
        sparseferry.load(dst, memory_budget=1, **kw)
    return e.value.minimum_bytes


IDS = torch.tensor([[3, 17, 99, 4, 250, 31, 7], [45, 2, 9, 120, 66, 5, 200]])


@pytest.mark.parametrize("family", FAMILIES)
def test_family_converts_exactly_and_computes_transformers_logits(tmp_path, family):
    src, model = make_tiny_moe(family, tmp_path, dtype=torch.float32)
    convert(src, tmp_path / "out", progress=False)
    assert_holds(tmp_path / "out", model)
    assert_experts_stored_per_expert(tmp_path / "out", model)
    ref = logits(model, IDS)
    for kw in (dict(), dict(memory_budget=minimum(tmp_path / "out"))):  # all resident; all streamed from disk
        sm = sparseferry.load(tmp_path / "out", **kw)
        torch.testing.assert_close(logits(sm, IDS), ref, rtol=0, atol=1e-5)
        sm.sparseferry.close()


def test_published_checkpoints_hold_one_tensor_per_expert(tmp_path):
    """The conversion mapping is what makes the difference: save_pretrained writes per-expert keys."""
    src, _ = make_tiny_moe("mixtral", tmp_path)
    keys = set(load_file(src / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)


def test_bf16_experts_round_trip_bit_for_bit_and_quantize(tmp_path):
    src, model = make_tiny_moe("qwen3_moe", tmp_path, max_shard_size="40KB")  # sharded: experts across files
    assert len(list(src.glob("*.safetensors"))) > 1
    convert(src, tmp_path / "out", progress=False)
    assert_holds(tmp_path / "out", model)
    stats = convert(src, tmp_path / "q", values="int8", group_size=32, progress=False)
    ckpt = open_checkpoint(tmp_path / "q")
    name = "model.layers.1.mlp.experts.down_proj"
    subs = ckpt.tensors[name].experts
    assert {s.values for s in subs} == {"int8"} and all(0 < s.rel_error < 0.01 for s in subs)
    assert stats["quantized"] >= 2 * 4 * 2  # every expert matrix of both layers, and more
    dense = model.state_dict()[name].float()
    got = ckpt.load(name).float()
    assert (got != 0).eq(dense != 0).all()  # the pattern is exact
    assert (got - dense).norm() / dense.norm() < 0.01


def test_pytorch_bin_checkpoints_convert_too(tmp_path):
    src, model = make_tiny_moe("mixtral", tmp_path)
    sd = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    torch.save(sd, src / "pytorch_model.bin")
    convert(src, tmp_path / "out", progress=False)
    assert_holds(tmp_path / "out", model)


def test_compressed_tensors_per_expert_bitmaps_import(tmp_path):
    src, model = make_tiny_moe("olmoe", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "dense",
                                  "sparsity_config": {"format": "sparse-bitmask", "targets": ["Linear"]}}
    (src / "config.json").write_text(json.dumps(cfg))
    tensors = {}
    for k, w in load_file(src / "model.safetensors").items():
        if ".layers." not in k or w.dim() != 2:
            tensors[k] = w
            continue
        p = k.removesuffix(".weight")
        b = w.contiguous().view(torch.int16).numpy()
        nz = (b & 0x7FFF) != 0
        tensors[f"{p}.shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
        tensors[f"{p}.compressed"] = torch.from_numpy(b[nz].copy()).view(torch.bfloat16)
        tensors[f"{p}.bitmask"] = torch.from_numpy(np.packbits(nz, axis=-1, bitorder="little"))
        tensors[f"{p}.row_offsets"] = torch.from_numpy(np.concatenate([[0], np.cumsum(nz.sum(1))[:-1]]).astype(np.int64))
    save_file(tensors, src / "model.safetensors")
    assert "model.layers.0.mlp.experts.2.up_proj.compressed" in tensors
    convert(src, tmp_path / "out", progress=False)
    assert_holds(tmp_path / "out", model)
    assert_experts_stored_per_expert(tmp_path / "out", model)


def test_inspect_reports_experts_per_layer(tmp_path):
    from sparseferry.report import inspect_checkpoint, render_inspect

    src, _ = make_tiny_moe("mixtral", tmp_path)
    convert(src, tmp_path / "out", progress=False)
    rep = inspect_checkpoint(tmp_path / "out", verify=True)
    ckpt = open_checkpoint(tmp_path / "out")
    row = rep["layers"][0]
    assert row["experts"] == 4 and row["expert_params"] == 2
    assert row["expert_bytes"] == sum(ckpt.expert_bytes(0, e) for e in range(4))
    assert row["expert_bytes_max"] == max(ckpt.expert_bytes(0, e) for e in range(4))
    assert 0.45 < row["expert_sparsity"] < 0.55  # pruned to 50% per matrix (the pattern's own slack)
    assert row["encoded"] >= 2 * 4  # every expert matrix counts
    assert rep["total"]["experts"] == 8
    text = render_inspect(rep)
    assert "experts" in text.splitlines()[1] and "max/expert" in text.splitlines()[1]


def test_the_pruner_reads_moe_folders_through_the_same_mapping(tmp_path):
    from sparseferry.prune.source import FolderSource

    src, model = make_tiny_moe("mixtral", tmp_path)
    source = FolderSource(src)
    for name, t in model.state_dict().items():
        if name in source.stored_names:
            assert_bit_equal(source.tensor(name), t, name)
    assert source.output_key("model.layers.0.mlp.experts.gate_up_proj") == "model.layers.0.mlp.experts.gate_up_proj"
    assert source.output_key("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the tensor, nothing written


def _edit(src, edit):
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, src / "model.safetensors")


def test_a_missing_expert_is_named(tmp_path):
    src, _ = make_tiny_moe("mixtral", tmp_path)
    _edit(src, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(ConvertError, match=r"missing model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight "
                                           r"\(building model\.layers\.1\.mlp\.experts\.gate_up_proj of 4 experts"):
        convert(src, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_experts_of_inconsistent_shapes_are_named(tmp_path):
    src, _ = make_tiny_moe("qwen2_moe", tmp_path)
    key = "model.layers.0.mlp.experts.1.up_proj.weight"
    _edit(src, lambda t: t.update({key: t[key][:-1].clone()}))
    with pytest.raises(ConvertError, match=rf"tensor {key} has shape \[31, 64\], expected \[32, 64\] like "
                                           r"model\.layers\.0\.mlp\.experts\.0\.up_proj\.weight"):
        convert(src, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_a_fused_expert_tensor_of_the_wrong_shape_is_named(tmp_path):
    src, _ = make_tiny_moe("gpt_oss", tmp_path)
    key = "model.layers.1.mlp.experts.down_proj"
    _edit(src, lambda t: t.update({key: t[key][:3].clone()}))
    with pytest.raises(ConvertError, match=rf"tensor {key} has shape \[3, 64, 64\], expected \[4, 64, 64\]"):
        convert(src, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_a_rule_whose_outputs_span_layers_is_refused(tmp_path, monkeypatch):
    """A checkpoint storing two layers' norms in one tensor, split by a rule: not one layer at a time."""
    import transformers.conversion_mapping as cm
    from transformers.core_model_loading import Chunk, WeightConverter

    src, _ = make_tiny_model("llama", tmp_path)
    monkeypatch.setattr(cm, "_checkpoint_conversion_mapping_cache", cm._build_checkpoint_conversion_mapping())
    cm._checkpoint_conversion_mapping_cache["llama"] = [WeightConverter(
        "layers.0.both_norms", ["layers.0.input_layernorm.weight", "layers.1.input_layernorm.weight"], [Chunk(dim=0)])]

    def fuse(t):
        t["model.layers.0.both_norms"] = torch.cat([t.pop("model.layers.0.input_layernorm.weight"),
                                                    t.pop("model.layers.1.input_layernorm.weight")])
    _edit(src, fuse)
    with pytest.raises(ConvertError, match=r"cannot be applied one decoder layer at a time: from model\.layers\.0\.both_norms "
                                           r"it builds model\.layers\.0\.input_layernorm\.weight, model\.layers\.1\."):
        convert(src, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("model_type, kw", [
    ("zamba", dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, attention_hidden_size=128,
                   layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], attention_head_dim=32, mamba_dt_rank=8,
                   n_mamba_heads=2, num_key_value_heads=4)),
    ("zamba2", dict(num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], mamba_d_state=16,
                    mamba_headdim=16, n_mamba_heads=8, adapter_rank=8, use_shared_attention_adapter=True,
                    num_key_value_heads=4)),
])
def test_decoder_layers_sharing_weights_are_refused(model_type, kw):
    """Zamba reuses one transformer block at several depths: never streamed as if each layer had its own
    (nor is a 2-entry adapter list taken for the decoder layers)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, vocab_size=260, hidden_size=64, intermediate_size=128,
                               num_attention_heads=4, max_position_embeddings=128, **kw).to_dict()
    with pytest.raises(ModelError, match=r"decoder layers share parameters \(model\.layers\.1\.shared_transf\S* is also "
                                         r"model\.layers\.3\.shared_transf"):
        info_from_config_dict(cfg)


# ----------------------------------------------------------------------------------------------
# Every MoE family transformers knows that builds tiny


def _sweep_types():
    return [t for t in moe_model_types() if t not in FAMILIES]


@pytest.mark.parametrize("model_type", _sweep_types())
def test_every_moe_family_converts_and_runs(tmp_path, model_type):
    try:
        config = tiny_moe_config(model_type)
        if meta_param_count(config) > 3_000_000:
            pytest.skip(f"{model_type}: not tiny at the sizes of moe_models.TINY")
    except Exception as e:  # noqa: BLE001 - transformers refuses the small sizes for this family
        pytest.skip(f"{model_type}: no tiny config ({type(e).__name__})")
    src, model = make_tiny_moe(model_type, tmp_path, dtype=torch.float32)
    try:
        ref = logits(model, IDS[:1, :5])
    except Exception as e:  # noqa: BLE001 - the tiny config does not run in transformers itself
        pytest.skip(f"{model_type}: transformers' own forward fails on the tiny config ({type(e).__name__})")
    convert(src, tmp_path / "out", progress=False)
    assert_holds(tmp_path / "out", model)
    _, _, info = info_from_config_dict(json.loads((src / "config.json").read_text()))
    if info.expert_params:
        assert_experts_stored_per_expert(tmp_path / "out", model)
    sm = sparseferry.load(tmp_path / "out")
    torch.testing.assert_close(logits(sm, IDS[:1, :5]), ref, rtol=0, atol=1e-5)
    sm.sparseferry.close()
