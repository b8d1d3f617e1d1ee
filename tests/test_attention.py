"""The decode-step attention `load` selects on the CPU: transformers' SDPA attention, GQA heads packed."""
from __future__ import annotations

import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sparseferry.runtime.attention import NAME, register, sparseferry_sdpa


def qkv(batch, heads, kv_heads, q_len, kv_len, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, q_len, d, generator=g), torch.randn(batch, kv_heads, kv_len, d, generator=g),
            torch.randn(batch, kv_heads, kv_len, d, generator=g))


@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (6, 6), (4, 1)])
def test_it_computes_what_transformers_sdpa_attention_computes(q_len, masked, heads, kv_heads):
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    q, k, v = qkv(2, heads, kv_heads, q_len, 9)
    mask = None
    if masked:  # sequence 1 left-padded by 3 positions, as a batch of prompts of two lengths
        mask = torch.ones(2, 1, q_len, 9, dtype=torch.bool)
        mask[1, :, :, :3] = False
    got, _ = sparseferry_sdpa(module, q, k, v, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert got.shape == want.shape == (2, q_len, heads, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_load_selects_it_on_the_cpu_unless_an_implementation_is_asked_for(tmp_path):
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    import sparseferry
    from sparseferry.convert import convert

    assert register() == NAME and AttentionInterface()[NAME] is sparseferry_sdpa
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ck", progress=False)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    for impl, expected in [(None, NAME), ("eager", "eager")]:
        m = sparseferry.load(tmp_path / "ck", attn_implementation=impl)
        try:
            assert m.config._attn_implementation == expected
            with torch.no_grad():
                got = m.generate(ids, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
        finally:
            m.sparseferry.close()
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.scores, want.scores):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
