"""Perplexity: the sliding windows score every token once, the result equals the HuggingFace guide's
strided loop (labels masked with -100, the model's own loss), and a pruned folder and its sparseferry
checkpoint (run by the streaming runtime under a budget) give the same perplexity."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import make_tiny_model

from sparseferry.errors import SparseferryError
from sparseferry.evaluate import EvalError, perplexity, windows

TEXT = " ".join(random.Random(0).choice("the of and to in is was for on that with as by at".split()) for _ in range(120))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("eval"), sparsity=None, dtype=torch.float32)


def hf_guide_perplexity(model, ids: torch.Tensor, seqlen: int, stride: int) -> float:
    """The strided loop of the HuggingFace perplexity guide, with exact token counts."""
    n = ids.numel()
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + seqlen, n)
        trg = end - prev_end
        x = ids[begin:end][None]
        labels = x.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = model(input_ids=x, labels=labels).loss
        valid = int((labels[:, 1:] != -100).sum())  # the model shifts labels left by one
        nll_sum += float(loss) * valid
        count += valid
        prev_end = end
        if end == n:
            break
    return math.exp(nll_sum / count)


@pytest.mark.parametrize("n,seqlen,stride", [(100, 32, 16), (100, 32, 32), (33, 32, 7), (5, 32, 16), (64, 16, 1)])
def test_windows_score_every_token_but_the_first_once(n, seqlen, stride):
    scored = []
    for begin, end, k in windows(n, seqlen, stride):
        assert end - begin <= seqlen and 1 <= k <= end - begin - 1
        scored += list(range(end - k, end))  # positions whose token is predicted
    if stride < seqlen:
        assert sorted(scored) == list(range(1, n))
    else:  # disjoint windows: the first token of each window has no context and is not scored
        assert len(set(scored)) == len(scored) and set(scored) <= set(range(1, n))


@pytest.mark.parametrize("seqlen,stride", [(64, 32), (48, 48), (128, 128)])
def test_perplexity_equals_the_hf_guide_loop(dense, seqlen, stride):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dense.folder)
    ids = torch.tensor(tok(TEXT)["input_ids"])
    res = perplexity(dense.folder, TEXT, seqlen=seqlen, stride=stride, progress=False)
    assert res["ppl"] == pytest.approx(hf_guide_perplexity(dense.model, ids, seqlen, stride), rel=1e-5)
    assert res["windows"] == len(windows(ids.numel(), seqlen, stride))
    assert res["nll"] == pytest.approx(math.log(res["ppl"]))


def test_text_files_and_max_windows(dense, tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    ref = perplexity(dense.folder, TEXT, seqlen=64, stride=32, progress=False)
    assert perplexity(dense.folder, tmp_path / "t.txt", seqlen=64, stride=32, progress=False)["ppl"] == ref["ppl"]
    assert perplexity(dense.folder, str(tmp_path / "t.jsonl"), seqlen=64, stride=32, progress=False)["ppl"] == ref["ppl"]
    one = perplexity(dense.folder, TEXT, seqlen=64, stride=32, max_windows=1, progress=False)
    assert one["windows"] == 1 and one["tokens"] == 63


def test_pruned_folder_and_its_checkpoint_agree(dense, tmp_path):
    import sparseferry
    from sparseferry.prune import prune

    kw = dict(method="magnitude", sparsity=0.7, progress=False)
    prune(dense.folder, tmp_path / "pruned-hf", save_dense=True, **kw)
    prune(dense.folder, tmp_path / "pruned-sf", **kw)
    assert hasattr(sparseferry, "load")
    ev = dict(seqlen=64, stride=32, progress=False)
    base = perplexity(dense.folder, TEXT, **ev)
    hf = perplexity(tmp_path / "pruned-hf", TEXT, **ev)
    sf = perplexity(tmp_path / "pruned-sf", TEXT, budget="300KiB", **ev)  # below the 419 KiB dense: layers stream
    assert sf["ppl"] == pytest.approx(hf["ppl"], rel=1e-4)
    assert sf["tokens"] == hf["tokens"] == base["tokens"]
    assert hf["ppl"] != pytest.approx(base["ppl"], rel=1e-6)  # pruning changed the model


def test_in_memory_model(dense):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dense.folder)
    a = perplexity(dense.model, TEXT, tokenizer=tok, seqlen=64, stride=32, progress=False)
    b = perplexity(dense.folder, TEXT, seqlen=64, stride=32, progress=False)
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6)
    with pytest.raises(EvalError, match="tokenizer"):
        perplexity(dense.model, TEXT, progress=False)


@pytest.mark.parametrize("kwargs,words", [
    (dict(seqlen=32, stride=64), "stride <= seqlen"),
    (dict(seqlen=1), "seqlen >= 2"),
    (dict(seqlen=4096), "exceeds the model's context of 128"),
    (dict(text=""), "empty"),
    (dict(text="a"), "at least 2"),
    (dict(text="missing/eval.txt"), "not found"),
    (dict(max_windows=0), "max_windows"),
    (dict(budget="1KiB"), "over the budget"),
])
def test_bad_input_is_a_clear_error(dense, kwargs, words):
    kwargs = {"text": TEXT, "seqlen": 64, "stride": 32, **kwargs}
    with pytest.raises(SparseferryError, match=words.replace("(", r"\(")):
        perplexity(dense.folder, kwargs.pop("text"), progress=False, **kwargs)


def test_cli_eval(dense, tmp_path, capsys):
    from sparseferry.cli import main

    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["eval", str(dense.folder), "--text", str(tmp_path / "t.txt"), "--seqlen", "64", "--stride", "32", "--json", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ppl"] == pytest.approx(perplexity(dense.folder, TEXT, seqlen=64, stride=32, progress=False)["ppl"])
    assert main(["eval", str(dense.folder), "--text", str(tmp_path / "none.txt"), "-q"]) == 1
    assert "not found" in capsys.readouterr().err
