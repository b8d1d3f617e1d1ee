"""Corrupted and forged checkpoints: each one ends in one clear error or in logits bit-identical to the pristine one.

The corpus (tests/corpus.py, seeded) edits copies of three pristine checkpoints of a tiny Llama
(bf16 values, int8 values, int4 values; one matrix wide enough for block offsets) in every way
listed there. Each variant is loaded and run three ways: streamed from disk (native kernels), fully
resident dense (decoded by the pure-torch reference at load), and streamed with
SPARSEFERRY_KERNEL=torch; `verify` and `inspect` run on it too. The only acceptable outcomes are a
SparseferryError whose message is one line, or logits equal bit for bit to the pristine checkpoint's.

CI runs every 6th variant; the whole corpus (a few hundred variants, a few minutes):
    SPARSEFERRY_FULL_CORPUS=1 .venv/bin/python -m pytest -q tests/test_corpus.py -s
"""
from __future__ import annotations

import collections
import os
import shutil

import pytest
import torch
from conftest import make_tiny_model
from corpus import corpus

import sparseferry
from sparseferry.convert import convert
from sparseferry.errors import SparseferryError
from sparseferry.report import inspect_checkpoint
from sparseferry.runtime import BudgetError
from sparseferry.store import open_checkpoint

FULL = os.environ.get("SPARSEFERRY_FULL_CORPUS") == "1"
IDS = [torch.arange(0, 5).view(1, 5) * 37 % 256, torch.arange(0, 24).view(2, 12) * 53 % 256]  # fused; >8 rows
MODES = ("disk", "resident", "torch")


def _minimum(folder) -> int:
    with pytest.raises(BudgetError) as e:
        sparseferry.load(folder, memory_budget=1)
    return e.value.minimum_bytes


def run(folder, mode: str, budget: int) -> list[torch.Tensor]:
    old = os.environ.get("SPARSEFERRY_KERNEL")
    if mode == "torch":
        os.environ["SPARSEFERRY_KERNEL"] = "torch"
    try:
        if mode == "resident":
            model = sparseferry.load(folder, resident_form="dense")
        else:
            model = sparseferry.load(folder, memory_budget=budget, storage="disk")
        try:
            with torch.no_grad():
                return [model(ids).logits for ids in IDS]
        finally:
            model.sparseferry.close()
    finally:
        if old is None:
            os.environ.pop("SPARSEFERRY_KERNEL", None)
        else:
            os.environ["SPARSEFERRY_KERNEL"] = old


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    src, _ = make_tiny_model("llama", base, intermediate_size=1040, tokenizer=False)  # down_proj: 1040 > 1024 columns
    out = {}
    for label, values in (("bf16", None), ("int8", "int8"), ("int4", "int4")):
        dst = base / f"pristine-{label}"
        convert(src, dst, values=values, group_size=16, progress=False)
        budget = _minimum(dst)
        out[label] = (dst, budget, {m: run(dst, m, budget) for m in MODES})
    return out


def outcome(folder, budget: int, want: dict) -> tuple[str, str]:
    """("error", message) or ("identical", "") for one corrupted folder; anything else fails the test."""
    for probe in (lambda: open_checkpoint(folder).verify(), lambda: inspect_checkpoint(folder)):
        try:
            probe()
        except SparseferryError as e:
            assert "\n" not in str(e), f"a multi-line error: {e}"
    for mode in MODES:
        try:
            got = run(folder, mode, budget)
        except SparseferryError as e:
            msg = str(e)
            assert "\n" not in msg, f"a multi-line error: {msg}"
            return "error", msg
        for g, w in zip(got, want[mode]):
            assert torch.equal(g.view(torch.int16 if g.dtype == torch.bfloat16 else torch.int32),
                               w.view(torch.int16 if w.dtype == torch.bfloat16 else torch.int32)), \
                f"logits differ from the pristine checkpoint's ({mode})"
    return "identical", ""


def test_every_corrupted_or_forged_checkpoint_is_refused_or_computes_the_pristine_logits(pristine, tmp_path):
    folders = {label: p[0] for label, p in pristine.items()}
    variants = corpus(folders, seed=12)
    chosen = variants if FULL else variants[::6]
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures = []
    for k, v in enumerate(chosen):
        label = v.name[1:v.name.index("]")]
        src, budget, want = pristine[label]
        work = tmp_path / f"v{k}"
        shutil.copytree(src, work, symlinks=True)
        v.apply(work)
        try:
            result, _ = outcome(work, budget, want)
        except AssertionError as e:
            failures.append(f"{v.name}: {e}")
            result = "FAILED"
        except Exception as e:  # noqa: BLE001 - a traceback is exactly what the corpus hunts
            failures.append(f"{v.name}: {type(e).__name__}: {e}")
            result = "FAILED"
        counts[v.kind][result] += 1
        shutil.rmtree(work, ignore_errors=True)
    total = collections.Counter()
    for c in counts.values():
        total.update(c)
    print(f"\ncorpus: {len(chosen)} of {len(variants)} variants; " + ", ".join(f"{k}: {n}" for k, n in sorted(total.items())))
    for kind, c in sorted(counts.items()):
        print(f"  {kind:<13} " + ", ".join(f"{k}: {n}" for k, n in sorted(c.items())))
    assert not failures, f"{len(failures)} variants neither refused nor identical:\n" + "\n".join(failures[:40])
    assert total["error"] > len(chosen) // 2  # the corpus is mostly damage, not no-ops
