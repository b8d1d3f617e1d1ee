"""Pruning: the mask rules of each method against independent oracles, SparseGPT's reconstruction
beating the mask-only methods, and end to end on tiny Llama / OPT / GPT-2 folders (random weights,
a word-level tokenizer built here): sparseferry checkpoint == --save-dense weights, and plain
transformers on the --save-dense folder reproduces the layer outputs the pruner computed."""
from __future__ import annotations

import json
import random
import re

import pytest
import torch
from conftest import assert_nothing_written, make_tiny_model

import sparseferry
from sparseferry.errors import SparseferryError
from sparseferry.prune import prune, render_report
from sparseferry.prune.magnitude import Magnitude, magnitude_mask
from sparseferry.prune.masks import PruneError, nm_valid, parse_pattern
from sparseferry.prune.samples import calibration_samples
from sparseferry.prune.sparsegpt import SparseGPT
from sparseferry.prune.wanda import Wanda

WORDS = ("the a of to and in is it that for on with as was by at be this from or have an are not but what all "
         "were when we there can which their if do will each about how up out them then she many some so").split()


def random_text(nwords: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(nwords))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Dense fp32 tiny models (conftest: 2 layers, hidden 64, byte-level tokenizer) and a calibration file."""
    root = tmp_path_factory.mktemp("models")
    out = {arch: make_tiny_model(arch, root, sparsity=None, dtype=torch.float32).folder for arch in ("llama", "opt", "gpt2")}
    (root / "calib.txt").write_text(random_text(1000, seed=1))
    out["calib"] = root / "calib.txt"
    return out


def layer_outputs(model, samples) -> list[torch.Tensor]:
    """Outputs of every decoder layer of a transformers model, per sample: [layer] of [nsamples, seqlen, hidden]."""
    from sparseferry.hf import find_decoder_layers

    _, layers = find_decoder_layers(model)
    got = [[] for _ in layers]
    hooks = [layer.register_forward_hook(lambda m, a, o, k=k: got[k].append((o[0] if isinstance(o, tuple) else o).detach()))
             for k, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for s in samples:
                model(input_ids=s, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(g) for g in got]


def correlated_inputs(tokens: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Inputs with low-rank correlation and uneven feature scales, like LLM activations."""
    x = torch.randn(tokens, 16, generator=gen) @ torch.randn(16, cols, generator=gen)
    x += 0.1 * torch.randn(tokens, cols, generator=gen)
    return x * (torch.rand(cols, generator=gen) * 4)


# ---------------------------------------------------------------------------------------------
# Mask rules against oracles


def test_magnitude_matches_a_sort_oracle():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g)
    for s in (0.0, 0.3, 0.5, 0.9):
        k = int(w.numel() * s)
        order = torch.sort(w.abs().flatten()).indices
        want = torch.zeros(w.numel(), dtype=torch.bool)
        want[order[:k]] = True
        assert torch.equal(magnitude_mask(w, s), want.view_as(w))
        kr = int(w.shape[1] * s)
        want_rows = torch.zeros_like(w, dtype=torch.bool)
        for r in range(w.shape[0]):
            want_rows[r, torch.sort(w[r].abs()).indices[:kr]] = True
        assert torch.equal(magnitude_mask(w, s, per_row=True), want_rows)


def test_nm_masks_keep_the_n_largest_of_every_group():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 32, generator=g)
    for n, m in ((2, 4), (4, 8), (1, 4)):
        mask = magnitude_mask(w, 0.0, (n, m))
        groups = w.abs().view(8, 32 // m, m)
        kept = groups.sort(dim=2, descending=True).values[:, :, :n]  # the N largest per group
        assert torch.equal(torch.sort(groups.masked_fill(mask.view(8, -1, m), -1), dim=2, descending=True).values[:, :, :n], kept)
        assert nm_valid(w.masked_fill(mask, 0), n, m)
        assert int(mask.sum()) == 8 * (32 // m) * (m - n)


def test_wanda_selects_the_papers_mask():
    """Paper, eq. 1: S_ij = |W_ij| * ||X_j||_2; per output row, the s fraction with the lowest S is pruned."""
    g = torch.Generator().manual_seed(2)
    rows, cols, s = 16, 48, 0.5
    w = torch.randn(rows, cols, generator=g)
    x = correlated_inputs(300, cols, g)
    pruner = Wanda(cols)
    for chunk in x.split(64):  # statistics arrive in batches, as from the calibration loop
        pruner.add_batch(chunk.reshape(1, -1, cols))
    got = pruner.prune(w, s, None, False)

    norms = torch.sqrt((x.double() ** 2).sum(dim=0))
    score = w.double().abs() * norms[None, :]
    want = w.clone()
    for r in range(rows):
        want[r, torch.argsort(score[r])[: int(cols * s)]] = 0
    assert torch.equal(got, want)

    got24 = pruner.prune(w, s, (2, 4), False)
    want24 = w.clone()
    for r in range(rows):
        for c in range(0, cols, 4):
            want24[r, c + torch.argsort(score[r, c : c + 4])[:2]] = 0
    assert torch.equal(got24, want24)


@pytest.mark.parametrize("pattern", [None, (2, 4), (4, 8)])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern):
    g = torch.Generator().manual_seed(3)
    for trial in range(3):
        rows, cols = 32, 160  # 160: two column blocks, the second partial
        w = torch.randn(rows, cols, generator=g)
        x = correlated_inputs(1024, cols, g)
        x[:, 7] = 0  # a dead input: SparseGPT must cope with a singular Hessian
        err = {}
        for cls in (Magnitude, Wanda, SparseGPT):
            p = cls(cols)
            for chunk in x.split(128):
                p.add_batch(chunk)
            wp = p.prune(w, 0.5, pattern, False)
            assert int((wp == 0).sum()) >= p.expected_pruned((rows, cols), 0.5, pattern, False)
            if pattern:
                assert nm_valid(wp, *pattern)
            err[cls.__name__] = float(torch.linalg.norm(x @ (w - wp).T))
        assert err["SparseGPT"] < err["Wanda"] and err["SparseGPT"] < err["Magnitude"], (trial, err)


def test_calibration_windows_are_seeded(folders, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders["llama"])
    text = random_text(500)
    a = calibration_samples(text, tok, nsamples=4, seqlen=16, seed=0)
    b = calibration_samples(text, tok, nsamples=4, seqlen=16, seed=0)
    c = calibration_samples(text, tok, nsamples=4, seqlen=16, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert all(s.shape == (1, 16) for s in a)
    # JSONL with a "text" field reads the same records as the plain text of them
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in (text[:1000], text[1000:])) + "\n")
    assert calibration_samples(tmp_path / "c.jsonl", tok, nsamples=2, seqlen=16, seed=0)[0].shape == (1, 16)


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_end_to_end_checkpoint_equals_dense_and_transformers_reproduces_the_layers(arch, folders, tmp_path):
    from transformers import AutoModelForCausalLM

    src = folders[arch]
    kw = dict(method="sparsegpt", sparsity=0.5, calibration=folders["calib"], nsamples=4, seqlen=32, seed=0, progress=False)
    rep = prune(src, tmp_path / "sf", **kw)
    rep_dense = prune(src, tmp_path / "dense", save_dense=True, **kw)

    # every linear weight of every layer pruned to at least 50%, reported per tensor
    info_names = {t["name"] for t in rep["tensors"]}
    assert len(info_names) == len(rep["tensors"]) and len(rep["tensors"]) >= 2 * 4
    assert all(t["sparsity"] >= 0.5 - 1e-9 for t in rep["tensors"])
    assert [t["sparsity"] for t in rep["tensors"]] == [t["sparsity"] for t in rep_dense["tensors"]]

    # the checkpoint's decoded weights equal the --save-dense folder's, tensor for tensor
    from safetensors import safe_open

    ckpt = sparseferry.open_checkpoint(tmp_path / "sf")
    ckpt.verify()
    index = json.loads((tmp_path / "dense" / "model.safetensors.index.json").read_text())
    dense = {}
    for key, fname in index["weight_map"].items():
        with safe_open(tmp_path / "dense" / fname, framework="pt") as f:
            dense[key] = f.get_tensor(key)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    names = {n for n in ckpt.tensors}
    for n in names:
        key = n if n in dense else n.split(".", 1)[1]  # GPT-2 checkpoints omit the "transformer." prefix
        assert torch.equal(ckpt.load(n), dense[key]), n
    assert any(ckpt.tensors[n].encoding == "bitmap" for n in names)

    # transformers on the --save-dense folder: the same weights, and the layer outputs the pruner computed
    for t in rep["tensors"]:
        w = model.get_parameter(t["name"])
        assert float((w == 0).float().mean()) == pytest.approx(t["sparsity"])
    from transformers import AutoTokenizer

    samples = calibration_samples(folders["calib"], AutoTokenizer.from_pretrained(src), nsamples=4, seqlen=32, seed=0)
    outs = layer_outputs(model, samples)
    for e, y in zip(rep["layers"], outs):
        assert float(y.double().square().mean()) == pytest.approx(e["output_mean_sq"], rel=1e-5)
        assert 0 < e["rel_error"] < 1


def test_pruning_is_deterministic_for_a_seed(folders, tmp_path):
    kw = dict(method="wanda", calibration=folders["calib"], nsamples=4, seqlen=16, progress=False)
    prune(folders["llama"], tmp_path / "a", seed=0, **kw)
    prune(folders["llama"], tmp_path / "b", seed=0, **kw)
    prune(folders["llama"], tmp_path / "c", seed=5, **kw)
    digests = {d: {k: v["digest"] for k, v in json.loads((tmp_path / d / "sparseferry.json").read_text())["files"].items()}
               for d in "abc"}
    assert digests["a"] == digests["b"]
    assert digests["a"] != digests["c"]


@pytest.mark.parametrize("method,pattern", [("magnitude", "2:4"), ("wanda", "4:8"), ("sparsegpt", "2:4")])
def test_nm_pattern_end_to_end(method, pattern, folders, tmp_path):
    rep = prune(folders["opt"], tmp_path / "o", method=method, pattern=pattern, calibration=folders["calib"],
                nsamples=4, seqlen=16, progress=False)
    n, m = parse_pattern(pattern)
    assert rep["nm_valid"] is True and rep["sparsity"] == (m - n) / m
    ckpt = sparseferry.open_checkpoint(tmp_path / "o")
    for t in rep["tensors"]:
        w = ckpt.load(t["name"])
        assert nm_valid(w if "transformer" not in t["name"] else w.T, n, m)
    assert "N:M valid" in render_report(rep)


def test_magnitude_without_calibration_keeps_source_dtype(tmp_path):
    src = make_tiny_model("llama", tmp_path, sparsity=None, dtype=torch.bfloat16).folder
    rep = prune(src, tmp_path / "out", method="magnitude", sparsity=0.6, per_row=True, progress=False)
    ckpt = sparseferry.open_checkpoint(tmp_path / "out")
    for t in rep["tensors"]:
        w = ckpt.load(t["name"])
        assert w.dtype == torch.bfloat16
        cols = w.shape[1]
        assert ((w == 0).sum(dim=1) >= int(cols * 0.6)).all()
    assert rep["layers"][0]["rel_error"] is None  # no calibration, no forward pass


def test_in_memory_model_is_pruned_in_place(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folders["gpt2"]).eval()
    ids = [torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(k)) for k in range(4)]
    rep = sparseferry.prune(model, tmp_path / "m", method="sparsegpt", calibration=ids, progress=False)  # the package is callable
    ckpt = sparseferry.open_checkpoint(tmp_path / "m")
    for t in rep["tensors"]:
        assert torch.equal(ckpt.load(t["name"]), model.get_parameter(t["name"]).detach())
        assert t["sparsity"] >= 0.5


def test_cli_prune(folders, tmp_path, capsys):
    from sparseferry.cli import main

    rc = main(["prune", str(folders["llama"]), str(tmp_path / "c"), "--method", "wanda", "--sparsity", "0.5",
               "--calib", str(folders["calib"]), "--nsamples", "4", "--seqlen", "16", "--json", "-q"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["method"] == "wanda" and len(rep["tensors"]) == 14
    # without --calib: the built-in text (tests/test_habits.py::test_prune_uses_the_built_in_text_by_default_and_says_so)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear SparseferryError, and no output folder left behind


@pytest.mark.parametrize("kwargs,words", [
    (dict(sparsity=1.0), "outside [0, 1)"),
    (dict(sparsity=-0.1), "outside [0, 1)"),
    (dict(pattern="4:4"), "0 < N < M"),
    (dict(pattern="3:2"), "0 < N < M"),
    (dict(pattern="two:four"), "does not parse"),
    (dict(pattern="1:3"), "not divisible by M=3"),
    (dict(method="obs"), "unknown pruning method"),
    (dict(method="sparsegpt", calibration="no/such/file.txt"), "not found"),
    (dict(method="wanda", calibration="EMPTY"), "empty"),
    (dict(method="wanda", calibration="SHORT"), "shorter than one sample"),
    (dict(method="sparsegpt", calibration="CALIB", budget="100KiB"), "needs at least"),
    (dict(method="magnitude", budget="1KiB"), "needs at least"),
])
def test_bad_input_is_a_clear_error_and_leaves_nothing(kwargs, words, folders, tmp_path):
    kwargs = dict(kwargs)
    cal = kwargs.get("calibration")
    if cal in ("EMPTY", "SHORT"):
        p = tmp_path / "cal.txt"
        p.write_text("" if cal == "EMPTY" else "the a of to")  # 12 byte tokens < seqlen 64
        kwargs["calibration"] = p
    elif cal == "CALIB":
        kwargs["calibration"] = folders["calib"]
    kwargs.setdefault("method", "magnitude")
    with pytest.raises(SparseferryError, match=re.escape(words)):
        prune(folders["llama"], tmp_path / "out", nsamples=4, seqlen=64, progress=False, **kwargs)
    assert_nothing_written(tmp_path / "out")


def test_model_without_decoder_layers_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8))
    with pytest.raises(SparseferryError, match="no decoder layers"):
        prune(model, tmp_path / "out", method="magnitude", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_existing_output_is_refused(folders, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(PruneError, match="already exists"):
        prune(folders["llama"], tmp_path / "out", method="magnitude", progress=False)


def test_failure_midway_removes_the_partial_output(folders, tmp_path, monkeypatch):
    import importlib

    P = importlib.import_module("sparseferry.prune")  # the package (sparseferry.prune is the function)

    calls = {"n": 0}
    real = P.check_pruned

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] > 9:  # a tensor of layer 1: layer 0 is written already
            raise PruneError("injected")
        return real(*a, **k)

    monkeypatch.setattr(P, "check_pruned", failing)
    for dense in (False, True):
        calls["n"] = 0
        with pytest.raises(PruneError, match="injected"):
            prune(folders["llama"], tmp_path / "out", method="magnitude", save_dense=dense, progress=False)
        assert_nothing_written(tmp_path / "out")
