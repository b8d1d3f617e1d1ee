"""Pruning mixtures of experts: every expert matrix pruned on its own, Wanda and SparseGPT from the tokens
the router sends to each expert, magnitude for an expert that got none; on tiny random Mixtral,
Qwen3-MoE, OLMoE, DeepSeek-V3 (shared + routed experts), gpt-oss (transposed experts with biases and
an interleaved clamped gate) and Qwen2-MoE (a linear shared-expert gate). The oracle for the routed
tokens is transformers itself: what the experts module of the dense (or already pruned) model
receives when the model runs the calibration samples. Then every MoE family of tests/moe_models.py
from the folder save_pretrained writes."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from moe_models import FAMILIES, make_tiny_moe
from conftest import VOCAB as MOE_VOCAB

from sparseferry.prune import prune, render_report
from sparseferry.prune.masks import nm_valid

SPARSITY = 0.5
VOCAB = 300
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
              max_position_embeddings=128, tie_word_embeddings=False)
CONFIGS = {
    "mixtral": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                      decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, head_dim=16),
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8),
    "gpt_oss": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=16),
    "qwen2_moe": dict(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8,
                      num_experts_per_tok=2),
}
TRANSPOSED = {"gpt_oss"}  # experts stored [E, in, out]


def tiny_moe(arch: str, seed: int = 0, layers: int = 2):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model(arch, **{**COMMON, "num_hidden_layers": layers}, **CONFIGS[arch])
        model = AutoModelForCausalLM.from_config(config).float().eval()
    if arch == "gpt_oss":  # transformers initialises its expert biases to zero: make them matter
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj_bias.data.normal_(0, 0.02)
            layer.mlp.experts.down_proj_bias.data.normal_(0, 0.02)
    for name, buf in model.named_buffers():  # DeepSeek-V3's router score correction: a persistent buffer, zero at init
        if name.endswith("e_score_correction_bias"):
            buf.normal_(0, 1)
    return model


def samples(n: int = 8, seqlen: int = 32, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, seqlen), generator=g) for _ in range(n)]


def experts_of(layer):
    """(name, module) of a decoder layer's fused experts module, or None."""
    return next(((n, m) for n, m in layer.named_modules() if type(m).__name__.endswith("Experts")), None)


def moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if experts_of(layer) is not None]


def reload(folder):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def matrices(arch: str, experts, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's first and down projection as [out, in]."""
    w1, w2 = experts.gate_up_proj[e].detach(), experts.down_proj[e].detach()
    return (w1.T, w2.T) if arch in TRANSPOSED else (w1, w2)


def down_input(arch: str, experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """The input of expert e's down projection, written out from each family's definition."""
    w1, _ = matrices(arch, experts, e)
    y = x @ w1.T
    if arch == "gpt_oss":  # interleaved gate/up, clamped, (up + 1) * gate * sigmoid(alpha * gate)
        y = y + experts.gate_up_proj_bias[e].detach()
        gate, up = y[:, ::2].clamp(max=experts.limit), y[:, 1::2].clamp(-experts.limit, experts.limit)
        return (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
    gate, up = y.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def routed_tokens(model, i: int, calib) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [T, hidden], top-k expert ids [T, k]) that layer i's experts module receives from `model`."""
    got = []
    _, mod = experts_of(model.model.layers[i])
    h = mod.register_forward_pre_hook(lambda m, args: got.append((args[0].detach().reshape(-1, args[0].shape[-1]),
                                                                  args[1].detach().reshape(args[0].numel() // args[0].shape[-1], -1))))
    try:
        with torch.no_grad():
            for s in calib:
                model(input_ids=s, use_cache=False)
    finally:
        h.remove()
    return torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])


def reference_inputs(dense, pruned, i: int, calib):
    """Layer i's routed tokens as the layer-sequential pruner sees them: layers before i pruned, layer i dense."""
    ref = copy.deepcopy(dense)
    for j in range(i):
        ref.model.layers[j].load_state_dict(pruned.model.layers[j].state_dict())
    return routed_tokens(ref, i, calib)


def wanda_reference_mask(w: torch.Tensor, x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda, eq. 1: S_ij = |W_ij| * ||X_j||_2, the lowest `sparsity` of each row pruned."""
    score = w.double().abs() * x.double().square().sum(0).sqrt()[None, :]
    mask = torch.zeros_like(w, dtype=torch.bool)
    k = int(w.shape[1] * sparsity)
    for r in range(w.shape[0]):
        mask[r, torch.argsort(score[r])[:k]] = True
    return mask


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_wanda_masks_are_the_papers_on_the_tokens_routed_to_each_expert(arch, tmp_path):
    dense = tiny_moe(arch)
    calib = samples(n=4)
    rep = prune(copy.deepcopy(dense), tmp_path / "out", method="wanda", sparsity=SPARSITY, calibration=calib,
                save_dense=True, progress=False)
    pruned = reload(tmp_path / "out")
    layers = moe_layers(dense)
    assert layers and [x["layer"] for x in rep["experts"]] == layers
    for i, summary in zip(layers, rep["experts"]):
        hidden, index = reference_inputs(dense, pruned, i, calib)
        _, ref_experts = experts_of(dense.model.layers[i])
        _, got_experts = experts_of(pruned.model.layers[i])
        E = ref_experts.num_experts
        counts = [int((index == e).any(dim=1).sum()) for e in range(E)]
        assert summary["tokens"] == counts and sum(counts) == hidden.shape[0] * index.shape[1]
        for e in range(E):
            x = hidden[(index == e).any(dim=1)]
            if x.shape[0] == 0:
                continue
            w1, w2 = matrices(arch, ref_experts, e)
            p1, p2 = matrices(arch, got_experts, e)
            assert torch.equal(p1 == 0, wanda_reference_mask(w1, x, SPARSITY)), (i, e, "first projection")
            assert torch.equal(p2 == 0, wanda_reference_mask(w2, down_input(arch, ref_experts, e, x), SPARSITY)), (i, e, "down")
            assert torch.equal(p1[p1 != 0], w1[p1 != 0])  # kept weights unchanged (Wanda does not update)
    experts_rows = [t for t in rep["tensors"] if "expert" in t]
    assert len(experts_rows) == 2 * sum(x["num_experts"] for x in rep["experts"])
    assert all(t["sparsity"] == SPARSITY for t in experts_rows)
    assert all(t["method"] == ("wanda" if t["tokens"] else "magnitude (no routed tokens)") for t in experts_rows)
    assert "routed calibration tokens per expert" in render_report(rep)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_sparsegpt_reconstructs_a_routed_expert_better_than_wanda_and_magnitude(arch, tmp_path):
    dense = tiny_moe(arch, layers=1)
    calib = samples(n=16)
    hidden, index = routed_tokens(dense, 0, calib)
    _, ref = experts_of(dense.model.layers[0])
    counts = torch.tensor([int((index == e).any(dim=1).sum()) for e in range(ref.num_experts)])
    e = int(counts.argmax())
    x = hidden[(index == e).any(dim=1)]
    w1, w2 = matrices(arch, ref, e)
    z = down_input(arch, ref, e, x)
    err = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        prune(copy.deepcopy(dense), tmp_path / method, method=method, sparsity=SPARSITY, calibration=calib,
              save_dense=True, progress=False)
        p1, p2 = matrices(arch, experts_of(reload(tmp_path / method).model.layers[0])[1], e)
        err[method] = (float(torch.linalg.norm(x @ (w1 - p1).T)), float(torch.linalg.norm(z @ (w2 - p2).T)))
    for j in (0, 1):
        assert err["sparsegpt"][j] < err["wanda"][j] and err["sparsegpt"][j] < err["magnitude"][j], err


def test_an_expert_no_token_was_routed_to_is_magnitude_pruned_and_reported(tmp_path):
    dense = tiny_moe("gpt_oss", layers=1)
    for layer in dense.model.layers:
        layer.mlp.router.bias.data[3] = -1e4  # the router never chooses expert 3
    rep = prune(copy.deepcopy(dense), tmp_path / "out", method="sparsegpt", sparsity=SPARSITY, calibration=samples(),
                save_dense=True, progress=False)
    pruned = reload(tmp_path / "out")
    for i, summary in enumerate(rep["experts"]):
        assert summary["tokens"][3] == 0 and summary["no_tokens"] == [3] and min(summary["tokens"][:3]) > 0
        for w, p in zip(matrices("gpt_oss", experts_of(dense.model.layers[i])[1], 3),
                        matrices("gpt_oss", experts_of(pruned.model.layers[i])[1], 3)):
            k = int(w.numel() * SPARSITY)  # magnitude over the whole matrix: the k smallest |w|
            want = w.flatten().clone()
            want[torch.argsort(w.abs().flatten())[:k]] = 0
            assert torch.equal(p.flatten(), want)
    rows = {t["method"] for t in rep["tensors"] if t.get("expert") == 3}
    assert rows == {"magnitude (no routed tokens)"}
    assert {t["method"] for t in rep["tensors"] if t.get("expert") == 0} == {"sparsegpt"}
    assert "1 experts saw none (magnitude): [3]" in render_report(rep)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_nm_patterns_apply_to_every_expert_along_its_inputs(arch, tmp_path):
    dense = tiny_moe(arch, layers=1)
    rep = prune(copy.deepcopy(dense), tmp_path / "out", method="wanda", pattern="2:4", calibration=samples(),
                save_dense=True, progress=False)
    assert rep["nm_valid"] is True
    pruned = reload(tmp_path / "out")
    for i in moe_layers(pruned):
        _, experts = experts_of(pruned.model.layers[i])
        for e in range(experts.num_experts):
            for w in matrices(arch, experts, e):  # [out, in]: groups of 4 consecutive inputs of a row
                assert nm_valid(w, 2, 4) and float((w == 0).float().mean()) == 0.5


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2_moe"])
def test_magnitude_prunes_each_expert_to_the_target_and_keeps_routing_gates_dense(arch, tmp_path):
    dense = tiny_moe(arch)
    rep = prune(copy.deepcopy(dense), tmp_path / "out", method="magnitude", sparsity=0.6, save_dense=True,
                progress=False)
    pruned = reload(tmp_path / "out")
    for i in moe_layers(dense):
        _, ref = experts_of(dense.model.layers[i])
        _, got = experts_of(pruned.model.layers[i])
        for e in range(ref.num_experts):
            for w, p in zip(matrices(arch, ref, e), matrices(arch, got, e)):
                k = int(w.numel() * 0.6)
                assert int((p == 0).sum()) == k
                assert w[p == 0].abs().max() <= w[p != 0].abs().min()  # the smallest of this expert, not of all
    assert all(x["tokens"] is None for x in rep["experts"])
    state = dict(pruned.named_parameters())
    shared_gates = [n for n in state if n.endswith("shared_expert_gate.weight")]
    assert (arch == "qwen2_moe") == bool(shared_gates)
    for n in shared_gates:  # a routing gate: dense; the shared expert beside it: pruned
        assert int((state[n] == 0).sum()) == 0
        assert float((state[n.replace("shared_expert_gate", "shared_expert.up_proj")] == 0).float().mean()) == pytest.approx(0.6, abs=0.01)
    shared = [n for n in state if ".shared_experts." in n and n.endswith("proj.weight")]
    assert (arch == "deepseek_v3") == bool(shared)
    assert all(float((state[n] == 0).float().mean()) == pytest.approx(0.6, abs=0.01) for n in shared)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_checkpoint_experts_equal_the_save_dense_folder_that_transformers_reloads(arch, tmp_path):
    """From a folder in the published layout: `synth` (one tensor per Mixtral expert), gpt-oss as
    save_pretrained writes it (fused, with per-expert biases), DeepSeek-V3 (a persistent router buffer)."""
    import sparseferry
    from sparseferry.synth import synth

    if arch == "mixtral":
        synth(tmp_path / "src", arch="mixtral", params="3M", vocab=512, sparsity=0.0, dtype="float32", progress=False)
    else:
        tiny_moe(arch, layers=1 if arch == "gpt_oss" else 2).save_pretrained(tmp_path / "src")
    kw = dict(method="wanda", sparsity=SPARSITY, calibration=samples(n=4), progress=False)
    rep = prune(tmp_path / "src", tmp_path / "sf", **kw)
    rep_dense = prune(tmp_path / "src", tmp_path / "dense", save_dense=True, **kw)
    assert [t["sparsity"] for t in rep["tensors"]] == [t["sparsity"] for t in rep_dense["tensors"]]
    assert [x["tokens"] for x in rep["experts"]] == [x["tokens"] for x in rep_dense["experts"]]
    ckpt = sparseferry.open_checkpoint(tmp_path / "sf")
    ckpt.verify()
    model, source = reload(tmp_path / "dense"), reload(tmp_path / "src")
    reloaded = dict(model.state_dict())
    for n, b in source.state_dict().items():  # persistent buffers too
        if n not in dict(source.named_parameters()):
            assert torch.equal(reloaded[n], b), n
    i = moe_layers(model)[0]  # the routing the pruner counted is transformers' on the source weights
    hidden, index = reference_inputs(source, model, i, samples(n=4))
    assert rep["experts"][0]["tokens"] == [int((index == e).any(dim=1).sum()) for e in range(index.max() + 1)]
    assert ckpt.num_experts(i) == experts_of(model.model.layers[i])[1].num_experts
    for n in ckpt.tensors:
        assert torch.equal(ckpt.load(n), reloaded[n]), n
    for n in ckpt.expert_params(i):  # every expert matrix bitmap-encoded; biases dense
        subs = ckpt.tensors[n].experts
        assert {s.encoding for s in subs} == ({"dense"} if n.endswith("_bias") else {"bitmap"}), n


def test_memory_estimate_holds_one_experts_statistics_and_the_routed_inputs():
    from sparseferry.prune.memory import estimate_memory

    def est(num_experts, method, nsamples=4):
        layer = {"experts.gate_up_proj": (num_experts, 64, 64), "experts.down_proj": (num_experts, 64, 32)}
        return estimate_memory(layer_shapes=[layer], linear_shapes=[{}], expert_shapes=[{"experts.gate_up_proj": (64, 64),
                               "experts.down_proj": (64, 32)}], non_layer_compute=0, non_layer_stored=0, source_itemsize=2,
                               method=method, nsamples=nsamples, seqlen=32, hidden=64, heads=4, calibrated=True, top_k=2)

    assert est(8, "sparsegpt").statistics == est(128, "sparsegpt").statistics  # experts are pruned one at a time
    assert est(8, "sparsegpt").statistics >= (64 * 64 + 32 * 32) * 4 + 4 * 32 * 64 * 4  # their Hessians + the inputs
    assert est(8, "wanda", nsamples=8).statistics - est(8, "wanda", nsamples=4).statistics >= 4 * 32 * 64 * 4
    assert est(128, "sparsegpt").layer > est(8, "sparsegpt").layer


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_family_prunes_each_expert_from_its_published_folder(arch, tmp_path):
    """Folders as save_pretrained writes them (per-expert tensors, or fused where the family publishes
    fused experts): each expert matrix at the target, routed tokens counted, transformers reloads the output."""
    from sparseferry.hf import expert_parameters, find_decoder_layers
    from sparseferry.store import expert_slices

    tm = make_tiny_moe(arch, tmp_path, sparsity=None, dtype=torch.float32)
    calib = [torch.randint(0, MOE_VOCAB, (1, 16), generator=torch.Generator().manual_seed(j)) for j in range(4)]
    rep = prune(tm.folder, tmp_path / "out", method="wanda", sparsity=SPARSITY, calibration=calib, save_dense=True,
                progress=False)
    pruned = reload(tmp_path / "out")
    prefix, layers = find_decoder_layers(pruned)
    experts = expert_parameters(layers, prefix)
    state = dict(pruned.named_parameters())
    matrices_seen = 0
    for name, e in experts.items():
        for w in expert_slices(state[name].detach(), e):
            if w.dim() == 2:
                matrices_seen += 1
                assert int((w == 0).sum()) == int(w.shape[1] * SPARSITY) * w.shape[0], name
    assert matrices_seen and len([t for t in rep["tensors"] if "expert" in t]) == matrices_seen
    for x in rep["experts"]:
        if x["routed"]:
            assert sum(x["tokens"]) == 4 * 16 * pruned.config.get_text_config().num_experts_per_tok
        else:
            assert x["tokens"] is None and "magnitude" in x["note"]
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=calib[0]).logits).all()


def test_cli_prune_of_a_synthetic_mixture_of_experts(tmp_path, capsys):
    from sparseferry.cli import main
    from sparseferry.synth import synth

    synth(tmp_path / "src", arch="qwen3_moe", params="3M", vocab=512, sparsity=0.0, progress=False)
    assert main(["prune", str(tmp_path / "src"), str(tmp_path / "out"), "--method", "magnitude", "--sparsity", "0.6",
                 "-q"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.experts.gate_up_proj[*]" in out and "(64 experts): magnitude per expert" in out
    import sparseferry

    ckpt = sparseferry.open_checkpoint(tmp_path / "out")
    w = ckpt.load("model.layers.1.mlp.experts.down_proj")
    assert w.shape[0] == 64 and all(int((w[e] == 0).sum()) == int(0.6 * w[e].numel()) for e in range(64))
