"""Mixture-of-experts models stream their layers' bases and read only the experts their routers choose.

The oracle is transformers running the same weights: the tiny random models of tests/moe_runtime_models.py
(six families), written as checkpoints with every expert stored on its own, give the same logits
and the same greedy tokens at every budget from the minimum to everything resident, from disk and
from host memory, for a padded batch of prompts.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import time

import pytest
from conftest import RSS_SCRIPT

from sparseferry.runtime.placeholders import StreamedWeight
import torch

import sparseferry
from sparseferry.runtime import BudgetError
from sparseferry.runtime.expert_cache import ExpertCache
from sparseferry.store import open_checkpoint

sys.path.insert(0, os.path.dirname(__file__))
from moe_runtime_models import FAMILIES, SWEEP_FAMILIES, generic_moe_model, moe_checkpoint, moe_model  # noqa: E402


def minimum_budget(path) -> int:
    with pytest.raises(BudgetError) as e:
        sparseferry.load(path, memory_budget=1)
    return e.value.minimum_bytes


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{family: (model, checkpoint path)}, built once for the module."""
    cache = {}

    def get(family, **kw):
        key = (family, tuple(sorted(kw.items())))
        if key not in cache:
            model = moe_model(family, **kw)
            path = moe_checkpoint(model, tmp_path_factory.mktemp(family) / "ckpt")
            cache[key] = (model, path)
        return cache[key]

    return get


def _batch():
    """Two prompts, the shorter one left-padded."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 258, 0
    return ids, mask


def _greedy(model, ids, mask, n=6):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=258)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_tokens_equal_transformers_at_every_budget(family, built):
    model, path = built(family)
    ids, mask = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    ref_tokens = _greedy(model, ids, mask)
    low = minimum_budget(path)
    for storage, budget in [("disk", low), ("disk", "60%"), ("disk", None), ("host", low)]:
        sm = sparseferry.load(path, memory_budget=budget, storage=storage)
        try:
            with torch.no_grad():
                out = sm(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{storage} {budget}: {m}")
            if budget == low:
                assert torch.equal(_greedy(sm, ids, mask), ref_tokens), f"{storage} {budget}"
            st = sm.sparseferry.experts.cache.stats
            assert st.uses > 0 and st.hits + st.predicted + st.missed == st.uses
            if budget is None or storage == "host":
                assert st.bytes_read == 0  # every expert in memory
            else:
                assert st.bytes_read > 0
        finally:
            sm.sparseferry.close()


def _routed(model, ids) -> dict[int, set[int]]:
    """{layer: experts its router chose for ids} in transformers' own forward."""
    chosen, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        for m in layer.modules():
            if hasattr(m, "has_gate") and hasattr(m, "num_experts"):
                handles.append(m.register_forward_pre_hook(
                    lambda mod, args, i=i: chosen.setdefault(i, set()).update(args[1].flatten().tolist())))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return chosen


def test_only_the_chosen_experts_are_read(built, monkeypatch):
    model, path = built("qwen3_moe")
    ids = torch.randint(0, 256, (1, 1))
    want = _routed(model, ids)
    reads = []
    orig = ExpertCache._fill
    monkeypatch.setattr(ExpertCache, "_fill", lambda self, k, key: reads.append(key) or orig(self, k, key))
    sm = sparseferry.load(path, memory_budget=minimum_budget(path))
    reads.clear()  # the preload fills the two minimum slots
    monkeypatch.setattr(sm.sparseferry.experts.predictor, "after", lambda *a: None)  # no guesses: demand only
    with torch.no_grad():
        sm(ids)
    st = sm.sparseferry.experts.cache.stats
    assert st.uses == sum(len(s) for s in want.values())
    assert set(reads) <= {(i, e) for i, s in want.items() for e in s}
    assert len(reads) == st.missed and len(reads) + st.hits == st.uses
    ckpt = open_checkpoint(path)
    from sparseferry.io import buffer_size_for
    assert st.bytes_read == sum(buffer_size_for(*ckpt.expert_range(i, e)[1:]) for i, e in reads)
    sm.sparseferry.close()


def test_a_wrong_guess_costs_a_read_never_a_wrong_result(built, monkeypatch):
    model, path = built("mixtral")
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        ref = model(ids).logits
    sm = sparseferry.load(path, memory_budget="70%")
    pred = sm.sparseferry.experts.predictor
    wrong = lambda j, x, k: [e for e in range(4) if e not in set(_routed_cache[j])][:1] + [99]  # noqa: E731  (99: no such expert)
    _routed_cache = {i: sorted(s) for i, s in _routed(model, ids).items()}
    monkeypatch.setattr(pred, "_route", wrong)
    sm.sparseferry.experts.cache.close()  # empty the pool: every chosen expert must be read
    sm.sparseferry.experts.cache._clear()
    with torch.no_grad():
        out = sm(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    st = sm.sparseferry.experts.cache.stats
    assert st.prefetches > 0 and st.wasted > 0 and st.predicted == 0
    sm.sparseferry.close()


def test_a_right_guess_is_read_before_the_router_runs(built, monkeypatch):
    model, path = built("mixtral")
    ids = torch.randint(0, 256, (1, 1))
    truth = {i: sorted(s) for i, s in _routed(model, ids).items()}
    sm = sparseferry.load(path, memory_budget="70%")
    pred = sm.sparseferry.experts.predictor
    monkeypatch.setattr(pred, "_route", lambda j, x, k: truth[j])
    cache = sm.sparseferry.experts.cache
    cache.close()
    cache._clear()
    begin = cache.begin

    def begin_after_reads_started(layer, experts):  # a tiny layer computes faster than a read starts
        deadline = time.monotonic() + 10
        while cache.ahead and time.monotonic() < deadline:
            time.sleep(0.001)
        begin(layer, experts)

    monkeypatch.setattr(cache, "begin", begin_after_reads_started)
    with torch.no_grad():
        sm(ids)
    st = cache.stats
    # layer 0 has nothing ahead of it; every later layer's experts were read ahead
    assert st.missed == len(truth[0]) and st.predicted == sum(len(truth[i]) for i in truth if i > 0)
    sm.sparseferry.close()


def test_the_cache_keeps_the_most_used_experts(built):
    _, path = built("qwen3_moe")
    ckpt = open_checkpoint(path)
    from sparseferry.runtime.expert_cache import expert_slot_bytes
    cache = ExpertCache(ckpt, torch.device("cpu"), 3, expert_slot_bytes(ckpt))

    def use(layer, experts):
        cache.begin(layer, experts)
        left = set(experts)
        while left:
            e, _ = cache.take(layer, left)
            cache.done(layer, e)
            left.discard(e)

    for _ in range(3):
        use(0, [0])  # expert 0 of layer 0: used often
    for e in range(1, 8):
        use(0, [e])  # then seven others once each, through the two other slots
    before = cache.stats.hits
    use(0, [0])
    assert cache.stats.hits == before + 1  # still there: least frequently used goes first
    use(0, [6])
    assert cache.stats.hits == before + 2  # recency breaks ties among the once-used
    cache.close()


def test_plan_line_states_how_the_budget_is_split(built):
    _, path = built("olmoe")
    sm = sparseferry.load(path, memory_budget="60%")
    line = sm.sparseferry.plan.summary()
    assert re.search(r"expert cache \(\d+ of 24 experts\)", line) and "resident layer bases" in line, line
    plan = sm.sparseferry.plan
    assert plan.device_bytes <= plan.budget
    sm.sparseferry.close()
    sm = sparseferry.load(path, memory_budget=None)
    assert sm.sparseferry.plan.expert_slots == 24 and "(24 of 24 experts)" in sm.sparseferry.plan.summary()
    sm.sparseferry.close()


def test_summary_reports_expert_reads_per_token(built):
    _, path = built("qwen3_moe")
    sm = sparseferry.load(path, memory_budget=minimum_budget(path))
    _greedy(sm, torch.randint(0, 256, (1, 4)), torch.ones(1, 4, dtype=torch.long), n=5)
    s = sm.sparseferry.summary()
    ex = s["experts"]
    assert ex["chosen_per_token"] == 3 * 2  # 3 MoE layers, top-2, batch 1
    assert 0 <= ex["hit_rate"] <= 1 and ex["missed_reads"] + ex["predicted_reads"] > 0
    assert ex["expert_bytes_read_per_token"] > 0 and ex["needed_bytes_per_token"] >= ex["routed_expert_bytes_per_token"]
    assert s["bytes_read_per_token"] >= ex["expert_bytes_read_per_token"]
    sm.sparseferry.close()


def test_int8_experts_equal_transformers_on_the_dequantized_weights(tmp_path):
    model = moe_model("mixtral")
    path = moe_checkpoint(model, tmp_path / "q", values="int8", group_size=16)
    ckpt = open_checkpoint(path)
    model.load_state_dict({n: ckpt.load(n) for n in ckpt.tensors}, strict=False)  # the same (dequantized) weights
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
    for budget in (minimum_budget(path), None):
        sm = sparseferry.load(path, memory_budget=budget)
        with torch.no_grad():
            torch.testing.assert_close(sm(ids).logits, ref, rtol=1e-4, atol=1e-4)
        sm.sparseferry.close()


def test_fp32_router_in_a_bf16_model(tmp_path, monkeypatch):
    """HunYuan-MoE builds its router in fp32 inside a bf16 model and casts its input to the router
    weight's dtype. A streamed weight must report the dtype it is stored in (here bf16, bitmap-
    encoded), or F.linear gets fp32 x and bf16 W (`expected m1 and m2 to have the same dtype`)."""
    import sparseferry.runtime.experts as experts_mod
    from moe_runtime_models import _prune_

    from sparseferry.kernels import MATVEC_MAX_BATCH

    # more rows than the fused kernel takes: decompress + linear. Seeded: bf16 logits compared at 2e-2, and
    # an arbitrary prompt can put one of ~9000 just past it (rounding, the GEMMs summing in other orders)
    ids = torch.randint(0, 256, (1, MATVEC_MAX_BATCH + 4), generator=torch.Generator().manual_seed(0))
    model = moe_model("hunyuan_v1_moe", dtype=torch.bfloat16)  # router fp32, as the model class builds it
    path = moe_checkpoint(model, tmp_path / "fp32-router")
    with torch.no_grad():
        ref = model(ids).logits
        sm = sparseferry.load(path, memory_budget="60%")
        torch.testing.assert_close(sm(ids).logits, ref, rtol=2e-2, atol=2e-2)
    sm.sparseferry.close()

    model = model.to(torch.bfloat16)  # now the router too is bf16 in the checkpoint, and pruned
    with torch.no_grad():
        for layer in model.model.layers:
            _prune_(layer.mlp.gate.wg.weight.data, 0.7)
        ref = model(ids).logits
    path = moe_checkpoint(model, tmp_path / "bf16-router")
    monkeypatch.setattr(experts_mod, "find_router", lambda *a: None)  # the router streams with its layer
    sm = sparseferry.load(path, memory_budget="60%")
    wg = sm.model.layers[2].mlp.gate.wg.weight
    assert isinstance(wg, StreamedWeight) and wg.dtype == torch.bfloat16  # no values between uses, the stored dtype
    with torch.no_grad():
        torch.testing.assert_close(sm(ids).logits, ref, rtol=2e-2, atol=2e-2)
    sm.sparseferry.close()


def test_peak_rss_stays_under_budget_plus_allowance(tmp_path):
    model = moe_model("mixtral", dtype=torch.bfloat16, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                      num_local_experts=8)
    path = moe_checkpoint(model, tmp_path / "ckpt")
    del model
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), "30%"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    allowance = 16 * 2**20
    assert r["dense"] > 2 * (r["budget"] + allowance), "model too small for the test to mean anything"
    assert r["peak"] - r["before"] <= r["budget"] + allowance, r


def test_generate_cli_prints_the_expert_line(built, capsys):
    from sparseferry.cli import main

    from conftest import write_tokenizer

    _, path = built("mixtral")
    write_tokenizer(path)
    assert main(["generate", str(path), "--prompt", "hello", "--max-new-tokens", "4", "--budget", "60%"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"experts: 6 chosen/token, cache \d+ of 12 experts, hit rate \d+%", err), err
    assert "predicted" in err and "missed" in err


@pytest.mark.parametrize("model_type", SWEEP_FAMILIES)
def test_other_moe_families_at_the_minimum_budget(model_type, tmp_path):
    model = generic_moe_model(model_type)
    path = moe_checkpoint(model, tmp_path / "ckpt")
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        ref = model(ids).logits
        sm = sparseferry.load(path, memory_budget=minimum_budget(path))
        torch.testing.assert_close(sm(ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert sm.sparseferry.experts.cache.stats.missed > 0
    sm.sparseferry.close()


def test_an_experts_module_whose_class_overrides_the_decorated_forward_is_not_replaced():
    """A subclass of a fused-experts class with its own forward (Ergo's per-route norms) computes more
    than the experts backend: its layer streams whole instead of through `experts_forward`."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from sparseferry.runtime.experts import is_experts_module

    class MoreThanExperts(MixtralExperts):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return 2 * super().forward(hidden_states, top_k_index, top_k_weights)

    class SameForward(MixtralExperts):
        pass

    cfg = MixtralConfig(hidden_size=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    assert is_experts_module(MixtralExperts(cfg)) and is_experts_module(SameForward(cfg))
    assert not is_experts_module(MoreThanExperts(cfg))
    assert not is_experts_module(torch.nn.Linear(2, 2))
