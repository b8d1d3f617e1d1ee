"""`sparseferry synth`: plausible shapes for a requested size, exact sparsity, determinism, a folder transformers loads."""
from __future__ import annotations

import json

import pytest
import torch

from sparseferry.synth import (
    LADDER,
    Shape,
    SynthError,
    choose_shape,
    count_params,
    magnitude_prune_,
    parse_params,
    read_marker,
    synth,
)

TINY = dict(params="1.5M", vocab=512, shard_bytes=400_000, progress=False)


def total_params(arch: str, shape: Shape) -> int:
    fixed, per_layer = count_params(arch, shape)
    return fixed + shape.layers * per_layer


def load_state(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "mixtral", "qwen3_moe"])
@pytest.mark.parametrize("params", ["125M", "500M", "1B", "3B", "7B", "13B", "70B"])
def test_shape_has_about_the_requested_parameters(arch, params):
    shape = choose_shape(arch, params)
    assert abs(total_params(arch, shape) / parse_params(params) - 1) <= 0.125


def test_1b_llama_is_the_tinyllama_shape():
    assert choose_shape("llama", "1B") == Shape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)
    assert total_params("llama", choose_shape("llama", "1B")) == 1_100_048_384  # TinyLlama-1.1B


def test_sizes_between_rungs_refit_the_depth_of_a_real_shape():
    shape = choose_shape("llama", "2B")
    assert (shape.hidden, shape.intermediate) in {(r.hidden, r.intermediate) for r in LADDER}
    assert shape.layers not in {r.layers for r in LADDER if r.hidden == shape.hidden}
    assert abs(total_params("llama", shape) / 2e9 - 1) < 0.05


def test_parse_params():
    assert parse_params("1B") == 10**9 and parse_params("1.1b") == 1_100_000_000 and parse_params("350M") == 350 * 10**6
    assert parse_params(12345) == 12345
    for bad in ("one billion", "-1B", "0", "1X"):
        with pytest.raises(SynthError):
            parse_params(bad)


def test_too_few_parameters_for_the_embeddings_is_an_error():
    with pytest.raises(SynthError, match="embeddings"):
        choose_shape("llama", "1M")  # vocab 32000 x hidden 128 x 2 is already 8M


def test_magnitude_prune_is_exact_and_keeps_the_largest():
    w = torch.randn(37, 53)
    keep = w.clone()
    magnitude_prune_(w, 0.6)
    zeros = w == 0
    assert int(zeros.sum()) == round(0.6 * w.numel())
    assert keep[zeros].abs().max() <= keep[~zeros].abs().min()
    assert torch.equal(w[~zeros], keep[~zeros])
    ties = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 3.0]])  # threshold ties: the fallback still zeroes exactly k
    magnitude_prune_(ties, 0.5)
    assert int((ties == 0).sum()) == 3 and ties[0, 4:].tolist() == [2.0, 3.0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A pruned tiny synthetic llama, its unpruned twin (same seed), and a copy of the pruned one."""
    root = tmp_path_factory.mktemp("synth")
    pruned = root / "pruned"
    rec = synth(pruned, sparsity=0.5, seed=3, **TINY)
    synth(root / "dense", sparsity=0.0, seed=3, **TINY)
    synth(root / "again", sparsity=0.5, seed=3, **TINY)
    synth(root / "seed4", sparsity=0.5, seed=4, **TINY)
    return root, rec


def test_folder_layout_and_record(folders):
    root, rec = folders
    pruned = root / "pruned"
    shards = sorted(p.name for p in pruned.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((pruned / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert rec == read_marker(pruned)
    assert rec["bytes"] == sum((pruned / s).stat().st_size for s in shards) - sum(
        8 + int.from_bytes((pruned / s).read_bytes()[:8], "little") for s in shards)
    assert abs(rec["params"] / parse_params(TINY["params"]) - 1) <= 0.125
    assert {"config.json", "generation_config.json", "tokenizer.json", "synth.json"} <= {p.name for p in pruned.iterdir()}


def test_sparsity_is_exact_on_decoder_linear_weights_only(folders):
    root, _ = folders
    state = load_state(root / "pruned")
    linear = [n for n, t in state.items() if ".layers." in n and t.dim() == 2]
    assert linear
    for n in linear:
        assert int((state[n] == 0).sum()) == round(0.5 * state[n].numel()), n
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        assert int((state[n] == 0).sum()) == 0, n
    norms = [t for n, t in state.items() if t.dim() == 1]
    assert norms and all(torch.equal(t, torch.ones_like(t)) for t in norms)
    w = state["model.embed_tokens.weight"].float()
    assert 0.018 < float(w.std()) < 0.022 and abs(float(w.mean())) < 1e-3


def test_same_seed_same_weights_and_pruned_is_the_pruned_copy_of_unpruned(folders):
    root, _ = folders
    pruned, again, other, dense = (load_state(root / n) for n in ("pruned", "again", "seed4", "dense"))
    assert pruned.keys() == again.keys() == dense.keys()
    assert all(torch.equal(pruned[n], again[n]) for n in pruned)
    assert not torch.equal(pruned["lm_head.weight"], other["lm_head.weight"])
    for n, w in pruned.items():
        nz = w != 0
        assert torch.equal(w[nz], dense[n][nz]), n  # every kept weight is the unpruned value
        if (~nz).any():
            assert dense[n][~nz].abs().max() <= dense[n][nz].abs().min(), n  # zeroed: the smallest magnitudes


def test_transformers_loads_and_generates(folders):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, rec = folders
    model = AutoModelForCausalLM.from_pretrained(root / "pruned")
    tok = AutoTokenizer.from_pretrained(root / "pruned")
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == rec["params"]
    assert len(tok) == model.config.vocab_size == 512
    assert torch.equal(model.lm_head.weight, load_state(root / "pruned")["lm_head.weight"])
    ids = tok("ferry", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids["input_ids"].shape[1] + 5)
    assert tok.decode(out[0]).startswith("ferry")
    assert isinstance(tok.decode(list(range(model.config.vocab_size))), str)  # every id decodes


@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox"])
def test_other_families_load_in_transformers(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    rec = synth(tmp_path / arch, arch=arch, **TINY)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / arch)
    assert model.config.model_type == arch
    assert sum(p.numel() for p in model.parameters()) == rec["params"]


def test_existing_folder_is_reused_only_with_the_same_settings(folders):
    root, rec = folders
    before = {p.name: p.stat().st_mtime_ns for p in (root / "pruned").iterdir()}
    assert synth(root / "pruned", sparsity=0.5, seed=3, **TINY) == rec
    assert before == {p.name: p.stat().st_mtime_ns for p in (root / "pruned").iterdir()}
    with pytest.raises(SynthError, match="already exists"):
        synth(root / "pruned", sparsity=0.7, seed=3, **TINY)


def test_bad_arguments(tmp_path):
    with pytest.raises(SynthError, match="arch"):
        synth(tmp_path / "x", arch="nope", **TINY)
    with pytest.raises(SynthError, match="sparsity"):
        synth(tmp_path / "x", sparsity=1.0, **TINY)
    with pytest.raises(SynthError, match="dtype"):
        synth(tmp_path / "x", dtype="int8", **TINY)
    assert not (tmp_path / "x").exists()


def test_cli_synth(tmp_path, capsys):
    from sparseferry.cli import main

    assert main(["synth", str(tmp_path / "m"), "--params", "1.5M", "--vocab", "512", "--sparsity", "0.25", "-q"]) == 0
    assert "sparsity 0.25" in capsys.readouterr().out
    assert read_marker(tmp_path / "m")["sparsity"] == 0.25


MOE_TINY = dict(params="3M", vocab=512, shard_bytes=1_000_000, progress=False)


@pytest.mark.parametrize("arch, experts, top_k", [("mixtral", 8, 2), ("qwen3_moe", 64, 8)])
def test_moe_shapes_are_mixtral_and_qwen3_moe_like(arch, experts, top_k):
    for params in ("3M", "4B", "8B"):
        shape = choose_shape(arch, params, vocab=512 if params == "3M" else None)
        assert shape.experts >= experts and shape.top_k == top_k
    assert choose_shape("mixtral", "47B") == Shape(4096, 14336, 32, 32, 8, experts=8, top_k=2)  # Mixtral-8x7B
    assert choose_shape("qwen3_moe", "30B").head_dim == 128  # Qwen3-30B-A3B
    assert choose_shape("qwen3_moe", "4B", experts=96, top_k=4).experts == 96


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def moe_folder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    rec = synth(root / "m", arch=request.param, sparsity=0.5, seed=1, **MOE_TINY)
    return root / "m", rec


def test_moe_folder_is_what_save_pretrained_writes(moe_folder, tmp_path):
    """The oracle: transformers loads the folder (merging the per-expert tensors into fused experts) and
    saves it again (splitting them as published): same tensor names, shapes and values."""
    from transformers import AutoModelForCausalLM

    folder, rec = moe_folder
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == rec["params"]
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape[0] == rec["shape"]["experts"]
    assert model.config.num_experts_per_tok == rec["shape"]["top_k"]
    model.save_pretrained(tmp_path / "resaved")
    ours, theirs = load_state(folder), load_state(tmp_path / "resaved")
    assert ours.keys() == theirs.keys()
    assert any(".experts.1." in n for n in ours)  # one tensor per expert, as published
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_moe_every_expert_matrix_has_exact_sparsity_and_routers_stay_dense(moe_folder):
    folder, rec = moe_folder
    state = load_state(folder)
    expert = [n for n in state if ".experts." in n]
    assert len(expert) == 3 * rec["shape"]["experts"] * rec["shape"]["layers"]
    for n in expert:
        assert int((state[n] == 0).sum()) == round(0.5 * state[n].numel()), n
    routers = [n for n in state if n.endswith("gate.weight") and ".experts." not in n]
    assert routers and all(int((state[n] == 0).sum()) == 0 for n in routers)


def test_moe_sparsity_zero_is_the_unpruned_twin(moe_folder, tmp_path):
    folder, rec = moe_folder
    synth(tmp_path / "d", arch=rec["arch"], sparsity=0.0, seed=1, **MOE_TINY)
    dense = load_state(tmp_path / "d")
    for n, w in load_state(folder).items():
        nz = w != 0
        assert torch.equal(w[nz], dense[n][nz]), n


def test_moe_arguments_are_checked(tmp_path):
    with pytest.raises(SynthError, match="not a mixture of experts"):
        synth(tmp_path / "x", arch="llama", experts=8, **TINY)
    with pytest.raises(SynthError, match="top-k 9 is more than the 8 experts"):
        synth(tmp_path / "x", arch="mixtral", top_k=9, **MOE_TINY)
    with pytest.raises(SynthError, match="at least 1"):
        synth(tmp_path / "x", arch="qwen3_moe", experts=0, **MOE_TINY)
    assert not (tmp_path / "x").exists()


def test_cli_synth_moe(tmp_path, capsys):
    from sparseferry.cli import main

    assert main(["synth", str(tmp_path / "m"), "--arch", "qwen3_moe", "--params", "3M", "--vocab", "512",
                 "--experts", "80", "--top-k", "6", "-q"]) == 0
    assert "80 experts" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == ("qwen3_moe", 80, 6)
