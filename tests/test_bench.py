"""`sparseferry bench`: the harness on a tiny synthetic model (outputs, token agreement, fair accounting) and its parts.

Timings are never asserted: a benchmark's numbers belong in its report, not in a test.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparseferry.bench import SYSTEMS
from sparseferry.bench.ceilings import bound_s_per_step, disk_read_gbps, memory_gbps
from sparseferry.bench.measure import Pass, summarize
from sparseferry.bench.report import plot_sweep, render_table, results_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BENCH_ARGS = ["--params", "1.5M", "--vocab", "512", "--budget", "50%", "--prompt-tokens", "8", "--new-tokens", "4",
              "--warmup", "0", "--reps", "2", "--rounds", "2", "--threads", "1", "-q"]


end_to_end = pytest.mark.slow  # the end-to-end run: three worker processes, each importing transformers


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`sparseferry bench` on a tiny synthetic llama, through the CLI: (out folder, results.json)."""
    from sparseferry.cli import main

    out = tmp_path_factory.mktemp("bench") / "results"
    assert main(["bench", "--out", str(out), *BENCH_ARGS]) == 0
    return out, json.loads((out / "results.json").read_text())


def greedy_reference(folder: Path, prompt_ids, new_tokens: int) -> list[list[int]]:
    """transformers' own greedy tokens for the folder, everything in RAM."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor(prompt_ids)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


@end_to_end
def test_outputs_written(run):
    out, res = run
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC
    md = (out / "results.md").read_text()
    for s in SYSTEMS:
        assert f"| {s.name} |" in md
    assert res["machine"]["disk_read_GBps"] > 0 and res["machine"]["mem_GBps"] > 0
    assert {"torch", "transformers", "accelerate", "sparseferry"} <= set(res["versions"])
    assert [s["name"] for s in res["systems"]] == [s.name for s in SYSTEMS]
    for s in res["systems"]:
        for key in ("decode_s_per_token", "prefill_s", "tokens_per_s", "bytes_read_per_token", "speedup_vs_accelerate",
                    "bound_fraction", "peak_rss_bytes"):
            assert s[key] is not None and s[key] >= 0, (s["name"], key)
        assert len(s["reps"]) == 2 and s["tokens_stable"]
        # --rounds 2: every system ran in both rounds, its median round reported, compared round by round
        assert len(s["rounds_decode_s_per_token"]) == 2 and s["decode_s_per_token"] in s["rounds_decode_s_per_token"]
        assert len(s["same_round_speedup"]["accelerate"]["per_round"]) == 2
    assert len(res["machine"]["mem_GBps_rounds"]) == 2 and "| round 2 ms/token |" in md


@end_to_end
def test_every_system_decodes_the_tokens_transformers_decodes(run):
    """Greedy decoding of the same prompt gives the same tokens in every system run on the same weights."""
    _, res = run
    setup = res["setup"]
    prompt = json.loads(Path(res["setup"]["model_dir"], "synth.json").read_text())  # the folder is a synth folder
    assert prompt["sparsity"] == 0.5
    from sparseferry.bench.harness import prompt_ids

    ids, _ = prompt_ids(setup["model_dir"], batch=setup["batch"], length=setup["prompt_tokens"])
    expected = {"pruned": greedy_reference(Path(setup["model_dir"]), ids, setup["new_tokens"]),
                "unpruned": greedy_reference(Path(setup["dense_dir"]), ids, setup["new_tokens"])}
    for s in res["systems"]:
        if s["exact"]:
            assert s["tokens"] == expected[s["weights"]], s["name"]
    assert next(s for s in res["systems"] if s["name"] == "sparseferry-bitmap")["tokens_agree"] is True


@end_to_end
def test_same_budget_bytes_for_every_system_and_accelerate_really_offloads(run):
    _, res = run
    setup = res["setup"]
    assert setup["budget_bytes"] == setup["dense_weight_bytes"] // 2  # 50% of the DENSE weights
    acc = next(s for s in res["systems"] if s["name"] == "accelerate")
    assert acc["weights_disk_bytes"] > 0 and 0 < acc["weights_ram_bytes"] <= setup["budget_bytes"]
    assert acc["bytes_read_per_token"] > 0  # the page cache was emptied before each pass: it read from disk


@end_to_end
def test_sparseferry_reads_its_streamed_layers_from_disk_every_token(run):
    _, res = run
    for s in res["systems"]:
        if s["runner"] == "sparseferry":
            if s["exact"]:  # quantized checkpoints may fit the budget whole: nothing streamed
                assert s["weights_disk_bytes"] > 0
            if res["machine"]["disk_read_direct"] and s["bytes_read_per_token"] and s["weights_disk_bytes"]:
                # the kernel's count: O_DIRECT reads (4 KiB aligned) of every streamed layer, per token. The
                # reader runs up to two layers ahead, across the edges of the timed decode window (the first
                # decode step's first layers are read during the prefill), so a short run counts a little less
                # than a whole model per token; a run that cached its streamed layers would read ~0.
                assert 0.5 * s["weights_disk_bytes"] <= s["bytes_read_per_token"] <= 1.2 * s["weights_disk_bytes"] + 2**20
    bitmap = next(s for s in res["systems"] if s["name"] == "sparseferry-bitmap")
    dense = next(s for s in res["systems"] if s["name"] == "sparseferry-dense")
    assert bitmap["runtime_split"] is not None and "io_wait_s" in bitmap["runtime_split"]
    assert bitmap["weights_disk_bytes"] + bitmap["weights_ram_bytes"] < dense["weights_disk_bytes"] + dense["weights_ram_bytes"]


# -- the parts, on made-up numbers

def _fake(step: float, disk: int, ram: int, tokens=((1, 2),)) -> dict:
    return {"decode_s_per_step": step, "decode_s_per_token": step, "tokens_per_s": 1 / step, "prefill_s": 0.5,
            "bytes_read_per_step": disk, "bytes_read_per_token": disk, "peak_rss_bytes": 10**9, "weights_disk_bytes": disk,
            "weights_ram_bytes": ram, "tokens": [list(t) for t in tokens], "tokens_stable": True, "reps": []}


def _results(storage="disk"):
    machine = {"disk_read_GBps": 2.0, "disk_read_direct": True, "mem_GBps": 10.0, "cpu_count": 2, "load_average": [0, 0, 0]}
    setup = {"batch": 1, "budget": "30%", "budget_bytes": 3 * 10**8, "dense_weight_bytes": 10**9, "storage": storage,
             "prompt_tokens": 32, "new_tokens": 16, "dtype": "bfloat16", "reps": 3}
    systems = [({"name": "accelerate", "runner": "accelerate", "weights": "pruned", "convert": {}, "baseline": True, "exact": True},
                _fake(1.0, 7 * 10**8, 3 * 10**8)),
               ({"name": "sparseferry-dense", "runner": "sparseferry", "weights": "unpruned", "convert": {}, "baseline": False, "exact": True},
                _fake(0.5, 7 * 10**8, 3 * 10**8, tokens=((5, 6),))),
               ({"name": "sparseferry-bitmap", "runner": "sparseferry", "weights": "pruned", "convert": {}, "baseline": False, "exact": True},
                _fake(0.25, 4 * 10**8, 3 * 10**8, tokens=((1, 3),)))]
    return results_json(machine=machine, versions={}, setup=setup, systems=systems, storage=storage)


def test_speedup_bound_and_agreement_arithmetic():
    rows = {s["name"]: s for s in _results()["systems"]}
    assert rows["accelerate"]["speedup_vs_accelerate"] == 1.0
    assert rows["sparseferry-bitmap"]["speedup_vs_accelerate"] == 4.0
    assert rows["sparseferry-bitmap"]["bound_s_per_token"] == pytest.approx(0.2)  # 0.4 GB at 2 GB/s > 0.3 GB at 10 GB/s
    assert rows["sparseferry-bitmap"]["bound_fraction"] == pytest.approx(0.8)
    assert rows["sparseferry-bitmap"]["achieved_GBps"] == pytest.approx(1.6)
    assert rows["sparseferry-bitmap"]["tokens_agree"] is False  # same weights as the baseline, other tokens
    assert rows["sparseferry-dense"]["tokens_agree"] is None  # the only system on the unpruned weights
    host = {s["name"]: s for s in _results("host")["systems"]}
    assert host["sparseferry-bitmap"]["bound_s_per_token"] == pytest.approx(0.07)  # all 0.7 GB from RAM at 10 GB/s
    table = render_table(_results())
    assert "| sparseferry-bitmap | 250.0 |" in table and "4.00x" in table and "| NO |" in table


def test_bound_is_the_larger_transfer_not_the_sum():
    assert bound_s_per_step(2e9, 1e9, disk_gbps=1.0, mem_gbps=10.0) == pytest.approx(2.0)
    assert bound_s_per_step(0, 5e9, disk_gbps=1.0, mem_gbps=10.0) == pytest.approx(0.5)


def test_decode_time_runs_from_prefill_end_to_last_pass_without_cache_emptying():
    passes = [Pass(2, 8, 0.0, 1.0, 100, 0.0), Pass(2, 1, 1.5, 2.0, 40, 0.25), Pass(2, 1, 2.5, 3.0, 60, 0.25)]
    s = summarize(passes)
    assert s["prefill_s"] == 1.0 and s["decode_steps"] == 2
    assert s["decode_s_per_step"] == pytest.approx((3.0 - 1.0 - 0.5) / 2)
    assert s["tokens_per_s"] == pytest.approx(2 / 0.75) and s["decode_s_per_token"] == pytest.approx(0.375)
    assert s["bytes_read_per_step"] == 50 and s["bytes_read_per_token"] == 25


def test_ceilings_measure_something(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(torch.randint(0, 255, (3 << 20,), dtype=torch.uint8).numpy().tobytes())
    d = disk_read_gbps([tmp_path], block=1 << 20, depths=(1,), chunks=(1 << 20,))
    assert d["bytes"] == 3 << 20 and d["GBps"] > 0
    mem = memory_gbps(nbytes=8 << 20, reps=2)
    assert mem["GBps"] > 0 and mem["copy_GBps"] > 0 and mem["bytes"] == 8 << 20


def test_disk_ceiling_is_the_best_of_every_queue_depth_and_request_size(tmp_path):
    (tmp_path / "blob").write_bytes(torch.randint(0, 255, (4 << 20,), dtype=torch.uint8).numpy().tobytes())
    d = disk_read_gbps([tmp_path], max_bytes=8 << 20, block=1 << 20, depths=(1, 4), chunks=(64 << 10, 1 << 20, 2 << 20))
    # a chunk larger than the block is never a request size
    assert [(e["depth"], e["chunk"]) for e in d["sweep"]] == [(1, 64 << 10), (1, 1 << 20), (4, 64 << 10), (4, 1 << 20)]
    best = max(d["sweep"], key=lambda e: e["GBps"])
    assert d["GBps"] == best["GBps"] > 0 and (d["depth"], d["chunk"]) == (best["depth"], best["chunk"])
    assert d["bytes"] == 2 << 20  # each pair reads its share, past the previous pair's bytes (wrapping around)


def test_sweep_plot(tmp_path):
    doc = {"storage": "disk", "points": [{"sparsity": s, "budget": b, "speedup_vs_accelerate": 1 + s * (1 if b == "30%" else 2)}
                                         for s in (0.5, 0.7) for b in ("30%", "50%")]}
    plot_sweep(doc, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_MAGIC


def test_systems_list_is_one_line_per_system():
    names = [s.name for s in SYSTEMS]
    assert names[0] == "accelerate" and SYSTEMS[0].baseline and sum(s.baseline for s in SYSTEMS) == 1
    assert {"sparseferry-dense", "sparseferry-bitmap"} <= set(names) and len(set(names)) == len(names)


def test_moe_rows_say_what_routing_needed_against_what_was_read():
    res = _results()
    bitmap = next(s for s in res["systems"] if s["name"] == "sparseferry-bitmap")
    bitmap["plan"] = "plan"
    bitmap["runtime_split"] = {"io_wait_s": 1.0, "decompress_s": 0.0, "compute_s": 1.0,
                               "experts_needed_bytes_per_token": 5 * 10**8, "experts_routed_expert_bytes_per_token": 4.5e8,
                               "experts_chosen_per_token": 42, "experts_experts_total": 168, "experts_cache_slots": 80,
                               "experts_hit_rate": 0.5, "experts_predicted_reads": 30, "experts_missed_reads": 300,
                               "experts_wasted_reads": 12}
    line = render_table(res).splitlines()[-1]
    assert line.startswith("sparseferry-bitmap experts: 42 chosen per token of 168, cache 80 slots, hit rate 50%")
    assert "30 predicted, 300 missed, 12 wasted" in line and "needs 500.0 MB/token" in line
    assert "read 400.0 MB/token = 0.80x of that" in line  # 4e8 bytes read per token (the kernel's count)


def test_systems_are_chosen_by_name_in_run_order():
    from sparseferry.bench import BenchError, select_systems

    assert [s.name for s in select_systems("sparseferry-bitmap-int8,accelerate")] == ["accelerate", "sparseferry-bitmap-int8"]
    with pytest.raises(BenchError, match="unknown system nope"):
        select_systems(["accelerate", "nope"])


def test_a_quantized_conversion_is_named_by_its_group_size_so_a_new_default_is_a_new_conversion(tmp_path):
    from conftest import make_tiny_model

    from sparseferry.bench.harness import converted
    from sparseferry.store import open_checkpoint

    src, _ = make_tiny_model("llama", tmp_path / "src", dtype=torch.bfloat16, layers=1)
    dst = converted(src, tmp_path, {"values": "int8"}, progress=False)
    assert dst.name == f"{src.name}-sf-group_size=512-values=int8"
    assert {t.group_size for t in open_checkpoint(dst).tensors.values() if t.values} == {512}
    assert converted(src, tmp_path, {"values": "int8", "group_size": 512}, progress=False) == dst
    assert converted(src, tmp_path, {}, progress=False).name == f"{src.name}-sf"


def test_rounds_report_each_systems_median_round_and_same_round_speedups():
    """bench(rounds=3): all systems run once a round; a slow round counts against every system in it."""
    from sparseferry.bench.harness import median_round

    rounds = [_fake(t, 4 * 10**8, 3 * 10**8) for t in (0.30, 0.20, 0.25)]
    rounds[1]["prefill_s"] = 9.0  # every figure comes from the median round, not only its decode time
    med = median_round(rounds)
    assert med["decode_s_per_token"] == 0.25 and med["prefill_s"] == 0.5
    assert med["rounds_decode_s_per_token"] == [0.30, 0.20, 0.25]
    low = median_round(rounds[:2])  # an even count: the lower middle round
    assert low["decode_s_per_token"] == 0.20 and low["prefill_s"] == 9.0
    failed = [dict(rounds[0], failed=True), rounds[1], rounds[2]]
    assert median_round(failed)["rounds_decode_s_per_token"] == [None, 0.20, 0.25]
    assert median_round(failed)["decode_s_per_token"] == 0.20

    base = {"name": "transformers", "runner": "transformers", "weights": "pruned", "convert": {}, "baseline": True, "exact": True}
    ours = dict(base, name="sparseferry-bitmap", runner="sparseferry", baseline=False)
    llama = dict(base, name="llama.cpp-bf16", runner="llama.cpp", baseline=False)
    by_round = {"transformers": (1.0, 2.0, 1.0), "sparseferry-bitmap": (0.5, 0.5, 0.25), "llama.cpp-bf16": (0.5, 1.0, 0.5)}
    systems = [(d, median_round([_fake(t, 4 * 10**8, 0) for t in by_round[d["name"]]])) for d in (base, ours, llama)]
    res = _results()
    res = results_json(machine=dict(res["machine"], mem_GBps_rounds=[10.0, 9.0, 10.0]), versions={},
                       setup=dict(res["setup"], rounds=3, scenario="ram", storage="host"), systems=systems, storage="host")
    rows = {x["name"]: x for x in res["systems"]}
    sr = rows["sparseferry-bitmap"]["same_round_speedup"]
    assert sr["transformers"]["per_round"] == [2.0, 4.0, 4.0] and sr["transformers"]["median"] == 4.0
    assert sr["llama.cpp-bf16"] == {"per_round": [1.0, 2.0, 2.0], "median": 2.0, "min": 1.0, "max": 2.0}
    # the main table's figures are each system's median round: 2.0x here, 4.0x round by round
    assert rows["sparseferry-bitmap"]["decode_s_per_token"] == 0.5 and rows["sparseferry-bitmap"]["speedup_vs_baseline"] == 2.0
    table = render_table(res)
    assert "3 rounds" in table and "| round 1 ms/token | round 2 ms/token | round 3 ms/token |" in table
    assert "| sparseferry-bitmap | 500.0 | 500.0 | 250.0 | 4.00x (2.00-4.00) | 2.00x (1.00-2.00) |" in table
    assert "10.0, 9.0, 10.0 GB/s" in table
    one = render_table(_results())
    assert "round 1" not in one and "Round by round" not in one
