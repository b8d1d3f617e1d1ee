"""What users coming from transformers, Accelerate and llama.cpp type: `from_pretrained` keywords on
`load`, Hub ids, chat templates and the llama.cpp-style knobs of `generate`, `prune` without --calib,
and a `bench` that checks every system before running and never fails on a missing plot library."""
from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from conftest import make_checkpoint

import sparseferry
from sparseferry.cli import build_parser, main
from sparseferry.errors import SparseferryError
from sparseferry.runtime.hf_compat import HubIdError, UnsupportedOptionError

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("llama", tmp_path_factory.mktemp("habits")).folder


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory, ckpt):
    """The same checkpoint with a chat template in its tokenizer config."""
    import shutil

    dst = tmp_path_factory.mktemp("chat") / "ckpt"
    shutil.copytree(ckpt, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


# ----------------------------------------------------------------------------------------------
# load(): from_pretrained keywords


def _plan(model):
    try:
        return model.sparseferry.plan, model.sparseferry.device
    finally:
        model.sparseferry.close()


def test_from_pretrained_keywords_with_a_meaning_are_mapped(ckpt):
    plan, dev = _plan(sparseferry.load(ckpt, torch_dtype=torch.bfloat16, dtype="auto", low_cpu_mem_usage=True,
                                       trust_remote_code=False, device_map="cpu", max_memory={"cpu": "90%"}))
    assert dev == torch.device("cpu")
    assert plan.budget == int(0.9 * sparseferry.open_checkpoint(ckpt).stored_bytes())
    plan, dev = _plan(sparseferry.load(ckpt, device_map={"": "cpu"}, use_safetensors=True))
    assert dev == torch.device("cpu") and plan.budget is None
    plan, _ = _plan(sparseferry.load(ckpt, device_map="auto" if not torch.cuda.is_available() else "cpu",
                                     max_memory={"cpu": 10**9}))
    assert plan.budget == 10**9


@pytest.mark.parametrize("kwargs,words", [
    (dict(torch_dtype=torch.float16), "stores bfloat16.*sparseferry convert --dtype float16"),
    (dict(dtype="float32"), "stores bfloat16"),
    (dict(trust_remote_code=True), "trust_remote_code=True.*never executes code"),
    (dict(offload_folder="/tmp/off"), "offload_folder=.*storage='disk'"),
    (dict(load_in_8bit=True), "convert --values int8"),
    (dict(quantization_config={}), "convert --values"),
    (dict(revision="main"), "never downloads"),
    (dict(device_map={"model.layers.0": "cpu", "lm_head": "cuda:0"}), "several devices.*memory_budget"),
    (dict(device_map="disk"), "'cpu' or 'cuda'"),
    (dict(max_memory={0: "1GiB"}), "runs on 'cpu'"),
    (dict(max_memory={"cpu": "1GiB"}, memory_budget="1GiB"), "both given"),
    (dict(use_safetensors=False), "safetensors"),
])
def test_from_pretrained_keywords_without_one_are_refused_by_name(ckpt, kwargs, words):
    with pytest.raises(UnsupportedOptionError, match=words):
        sparseferry.load(ckpt, **kwargs)


def test_an_unknown_keyword_is_a_type_error_naming_it(ckpt):
    with pytest.raises(TypeError, match="unexpected keyword argument.*memory_bugdet"):
        sparseferry.load(ckpt, memory_bugdet="1GiB")


def test_a_hub_id_says_that_hub_ids_cannot_be_fetched(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubIdError) as e:
        sparseferry.load("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert main(["generate", "meta-llama/Llama-3.2-1B", "-p", "hi"]) == 1
    err = capsys.readouterr().err
    assert main(["convert", "Qwen/Qwen2.5-0.5B", str(tmp_path / "ckpt")]) == 1
    for msg in (str(e.value), err, capsys.readouterr().err):
        assert "Hub id" in msg and "never downloads" in msg and "huggingface-cli download" in msg
        assert "sparseferry convert" in msg
    with pytest.raises(SparseferryError, match="no such folder"):
        sparseferry.load(tmp_path / "not-here")  # a path, not an id: the plain message


# ----------------------------------------------------------------------------------------------
# generate: chat template, llama.cpp knobs


def _tokenizer(path):
    return sparseferry.load_tokenizer(path)


def _completions_from_cli(capsys, argv) -> list[str]:
    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["texts"]


def greedy(ckpt_dir, input_ids, n) -> str:
    """transformers' greedy continuation of exactly these ids on the checkpoint's weights (dense oracle)."""
    model = sparseferry.load(ckpt_dir, resident_form="dense")
    try:
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                                 do_sample=False, pad_token_id=258)
    finally:
        model.sparseferry.close()
    return _tokenizer(ckpt_dir).decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def test_generate_applies_the_chat_template_by_default_and_raw_skips_it(chat_ckpt, capsys, monkeypatch):
    monkeypatch.setenv("SPARSEFERRY_KERNEL", "torch")
    tok = _tokenizer(chat_ckpt)
    templated = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                        add_generation_prompt=True, tokenize=False)
    assert templated == "<s>system: Be brief.\n<s>user: Hi\n<s>assistant:"
    ids = tok(templated, return_tensors="pt", add_special_tokens=False)["input_ids"]
    got = _completions_from_cli(capsys, [str(chat_ckpt), "-p", "Hi", "--system", "Be brief.", "-n", "6"])
    assert got == [greedy(chat_ckpt, ids, 6)]
    raw_ids = tok("Hi", return_tensors="pt")["input_ids"]
    assert _completions_from_cli(capsys, [str(chat_ckpt), "-p", "Hi", "--raw", "-n", "6"]) == [greedy(chat_ckpt, raw_ids, 6)]


def test_a_system_prompt_without_a_chat_template_is_refused(ckpt, capsys):
    assert main(["generate", str(ckpt), "-p", "Hi", "--system", "Be brief."]) == 1
    assert "needs a chat template" in capsys.readouterr().err


def test_prompt_from_a_file_and_from_stdin(ckpt, tmp_path, capsys, monkeypatch):
    (tmp_path / "p.txt").write_text("Once upon\n")
    a = _completions_from_cli(capsys, [str(ckpt), "-f", str(tmp_path / "p.txt"), "-n", "4"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon\n"))
    b = _completions_from_cli(capsys, [str(ckpt), "-n", "4"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon"))
    c = _completions_from_cli(capsys, [str(ckpt), "--prompt-file", "-", "-n", "4"])
    d = _completions_from_cli(capsys, [str(ckpt), "-p", "Once upon", "-n", "4"])
    assert a == b == c == d


def test_sampling_knobs_reach_generate(ckpt, capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.update(threads=n))  # recorded, not applied
    from transformers import GenerationMixin

    orig = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        seen.update({k: kwargs.get(k) for k in ("top_k", "temperature", "repetition_penalty", "stop_strings", "do_sample")})
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    _completions_from_cli(capsys, [str(ckpt), "-p", "Hi", "-n", "3", "--temp", "0.7", "--top-k", "5",
                                   "--repeat-penalty", "1.3", "--stop", "\n\n", "--stop", "END", "-t", "1"])
    assert seen == {"threads": 1, "top_k": 5, "temperature": 0.7, "repetition_penalty": 1.3, "stop_strings": ["\n\n", "END"],
                    "do_sample": True}


def test_stop_strings_end_generation(ckpt, capsys):
    full = _completions_from_cli(capsys, [str(ckpt), "-p", "Hi", "-n", "40", "--raw"])[0]
    # a printable ASCII character of the output (a byte that is never part of a longer UTF-8 sequence)
    stop = next(ch for ch in full[1:-1] if ch.isascii() and ch.isprintable() and ch.strip())
    cut = _completions_from_cli(capsys, [str(ckpt), "-p", "Hi", "-n", "40", "--raw", "--stop", stop])[0]
    assert cut == full[: full.index(stop) + 1]


def test_version_and_the_generate_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"sparseferry {sparseferry.__version__}"
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    text = sub.format_help()
    for flag in ("--prompt-file", "--system", "--raw", "--top-k", "--repetition-penalty", "--stop", "--threads", "--temp"):
        assert flag in text, flag


# ----------------------------------------------------------------------------------------------
# prune without --calib, bench before and after


def test_prune_uses_the_built_in_text_by_default_and_says_so(tmp_path, capsys, monkeypatch):
    from conftest import make_tiny_model
    from test_prune import random_text

    import sparseferry.text
    from sparseferry.store import open_checkpoint

    asked = []
    text = random_text(600, seed=3)  # stands in for the (large) standard-library text: same code path, fast
    monkeypatch.setattr(sparseferry.text, "calibration_text", lambda source="stdlib": asked.append(source) or text)
    src, _ = make_tiny_model("llama", tmp_path, sparsity=None, dtype=torch.float32)
    assert main(["prune", str(src), str(tmp_path / "a"), "--method", "wanda", "--nsamples", "2", "--seqlen", "32", "-q"]) == 0
    assert "calibration: the built-in text" in capsys.readouterr().err
    assert asked == ["stdlib"]
    rep = sparseferry.prune(src, tmp_path / "b", method="sparsegpt", nsamples=2, seqlen=32, progress=False)
    assert rep["calibration"].startswith("built-in text")
    sparseferry.prune(src, tmp_path / "c", method="wanda", calibration=text, nsamples=2, seqlen=32, progress=False)
    a, c = open_checkpoint(tmp_path / "a"), open_checkpoint(tmp_path / "c")
    for n in a.tensors:  # the same windows of the same text: the same masks
        assert torch.equal(a.load(n), c.load(n)), n


def test_bench_refuses_a_budget_below_a_systems_minimum_before_running_anything(tmp_path, monkeypatch):
    from sparseferry.bench import SYSTEMS, harness

    ran = []
    monkeypatch.setattr(harness, "_run_worker", lambda *a, **k: ran.append(a) or {})
    systems = tuple(s for s in SYSTEMS if s.name in ("accelerate", "sparseferry-bitmap"))
    with pytest.raises(harness.BenchError, match=r"too small for: sparseferry-bitmap needs at least .*nothing was run"):
        harness.bench(out=tmp_path / "r", params="1.5M", vocab=512, budget="1%", systems=systems, prompt_tokens=8,
                      new_tokens=4, warmup=0, reps=1, progress=False)
    assert ran == []


def test_bench_writes_its_results_without_matplotlib_and_survives_a_failing_plot(tmp_path, monkeypatch, capsys):
    from sparseferry.bench import report

    results = {"systems": [], "setup": {}, "machine": {}}
    monkeypatch.setattr(report, "render_table", lambda r: "table\n")
    monkeypatch.setattr(report, "can_plot", lambda: False)
    paths = report.write_all(results, tmp_path)
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.md").exists()
    assert "png" not in paths and not (tmp_path / "results.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err
    monkeypatch.setattr(report, "can_plot", lambda: True)
    monkeypatch.setattr(report, "plot_results", lambda r, p: 1 / 0)
    assert "png" not in report.write_all(results, tmp_path)
    assert "ZeroDivisionError" in capsys.readouterr().err
