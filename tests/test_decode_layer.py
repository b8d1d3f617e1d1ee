"""The decode step `load` gives Llama-family layers on the CPU (runtime/decode_layer.py, csrc/decode.c):
the same numbers as the layer's own forward, in a dozen native calls."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import sparseferry
from sparseferry.kernels import native
from sparseferry.runtime import decode_layer

from conftest import make_checkpoint

pytestmark = pytest.mark.skipif(native._native is None, reason=f"native kernels not built: {native.LOAD_ERROR}")


def bf16(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


def every_bf16() -> torch.Tensor:
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


# -- the native pieces, against the torch operations they replace

@pytest.mark.parametrize("cos_batch", [1, 3])
@pytest.mark.parametrize("head_dim", [2, 64, 80, 128])
def test_rope_is_transformers_rotary_embedding_bit_for_bit(cos_batch, head_dim):
    b, t, hq, hkv = 3, 4, 6, 2
    q, k = bf16(b, t, hq, head_dim, seed=1, scale=8), bf16(b, t, hkv, head_dim, seed=2)
    cos, sin = bf16(cos_batch, t, head_dim, seed=3), bf16(cos_batch, t, head_dim, seed=4)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    got_q, got_k = native.rope_bf16(q.clone(), cos, sin), native.rope_bf16(k.clone(), cos, sin)
    assert torch.equal(got_q, want_q.transpose(1, 2)) and torch.equal(got_k, want_k.transpose(1, 2))


def test_silu_times_up_is_torchs_for_every_bf16_number():
    g = every_bf16()
    u = bf16(g.numel(), seed=5)
    got, want = native.silu_mul_bf16(g, u), F.silu(g) * u
    same = (got == want) | (got.isnan() & want.isnan())
    assert same.all(), f"{int((~same).sum())} differ, e.g. silu({g[~same][:4].tolist()})"


def test_add_and_round_are_torchs_bit_for_bit():
    a, b = every_bf16(), bf16(1 << 16, seed=6, scale=100)
    got, want = native.add_bf16(a, b), a + b
    assert torch.equal(got.isnan(), want.isnan())  # NaN is NaN (torch keeps the operand's payload bits)
    assert torch.equal(got[~want.isnan()].view(torch.int16), want[~want.isnan()].view(torch.int16))
    y = torch.randn(3, 1000) * torch.logspace(-30, 30, 1000)
    bias = bf16(1000, seed=7)
    assert torch.equal(native.round_bf16(y), y.to(torch.bfloat16))
    assert torch.equal(native.round_bf16(y, bias), (y + bias.float()).to(torch.bfloat16))


def test_a_product_rounded_by_the_same_call_is_the_product_rounded():
    from sparseferry.format import encode

    w = bf16(96, 160, seed=8)
    w[torch.rand(96, 160, generator=torch.Generator().manual_seed(9)) < 0.5] = 0
    bt, x, bias = encode(w), bf16(3, 160, seed=10), bf16(96, seed=11)
    path = native.available_paths()[0]
    prep = native.prepare_matvec(bt, path=path)
    y = native.matvec_prepared(prep, x, threads=2)
    assert torch.equal(native.matvec_prepared(prep, x, threads=2, bf16_out=True), y.to(torch.bfloat16))
    got = native.matvec_prepared(prep, x, threads=2, bf16_out=True, bias=bias)
    assert torch.equal(got, (y + bias.float()).to(torch.bfloat16))
    with pytest.raises(native.KernelError, match="bias"):
        native.matvec_prepared(prep, x, threads=2, bf16_out=True, bias=bias.float())
    with pytest.raises(native.KernelError, match="expected \\[batch, 160\\]"):
        native.matvec_prepared(prep, x[:, :100], threads=2)


def test_the_pieces_refuse_inputs_they_cannot_read():
    q, cs = bf16(1, 2, 4, 8), bf16(1, 2, 8)
    for x, c in [(q.float(), cs), (q, cs.float()), (q, bf16(1, 3, 8)), (q, bf16(2, 2, 8)),
                 (bf16(1, 2, 4, 16)[..., ::2], cs), (bf16(1, 2, 4, 7), bf16(1, 2, 7))]:
        with pytest.raises(native.KernelError, match="rope"):
            native.rope_bf16(x, c, c)
    with pytest.raises(native.KernelError, match="silu_mul"):
        native.silu_mul_bf16(bf16(4), bf16(5))
    with pytest.raises(native.KernelError, match="add"):
        native.add_bf16(bf16(4), bf16(4).float())
    with pytest.raises(native.KernelError, match="round_bf16"):
        native.round_bf16(torch.zeros(2, 4), bf16(5))


# -- the layers of a loaded model

def qwen3_checkpoint(tmp_path):
    """A tiny Qwen3 (q_norm / k_norm per head), converted: not one of conftest's families."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sparseferry.convert import convert

    from conftest import VOCAB, magnitude_prune_, linear_modules, write_tokenizer

    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                      bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()
    for mod in linear_modules(model).values():
        magnitude_prune_(mod.weight.data, 0.5)
    model.save_pretrained(tmp_path / "qwen3")
    write_tokenizer(tmp_path / "qwen3")
    convert(tmp_path / "qwen3", tmp_path / "qwen3-sf", progress=False)
    return tmp_path / "qwen3-sf", model


def checkpoint(arch, tmp_path, **kw):
    return qwen3_checkpoint(tmp_path) if arch == "qwen3" else make_checkpoint(arch, tmp_path, **kw)


def greedy(m, ids, n=6, mask=None):
    """Greedy decode of n tokens by hand: the logits of every step (the prefill's included)."""
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, use_cache=True)
        steps = [out.logits[:, -1]]
        cache = out.past_key_values
        for _ in range(n):
            nxt = steps[-1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = m(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    return torch.stack(steps, 1)


def transformers_cache(m):
    from transformers import DynamicCache

    return DynamicCache(config=m.config)


def own_forward(m):
    for layer in m.model.layers:
        layer.__dict__.pop("forward", None)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_decode_steps_are_the_layers_own_bit_for_bit(arch, tmp_path):
    ckpt, model = checkpoint(arch, tmp_path)
    ids = torch.randint(0, 250, (1, 11), generator=torch.Generator().manual_seed(1))
    m = sparseferry.load(ckpt)
    try:
        layers = list(m.model.layers)
        assert all("forward" in layer.__dict__ for layer in layers)
        fast = greedy(m, ids)
        assert all(layer._sf_layer_checked for layer in layers)  # the first step agreed, every later one ran fast
        own_forward(m)
        assert torch.equal(fast, greedy(m, ids))
    finally:
        m.sparseferry.close()
    with torch.no_grad():  # and transformers' dense model on the same weights, the oracle
        want = model(input_ids=ids).logits[:, -1].float()
    assert (fast[:, 0].float() - want).abs().max() <= 3e-2 * want.abs().max()


def test_batches_with_padding_and_short_prompts_take_the_fast_step(tmp_path):
    ckpt, _ = make_checkpoint("llama", tmp_path)
    ids = torch.randint(0, 250, (3, 5), generator=torch.Generator().manual_seed(2))  # 15 rows: prefill is torch's
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: a 4-D mask reaches the attention
    short = ids[:1, :3]  # 3 rows: the prefill itself takes the fast step
    m = sparseferry.load(ckpt)
    try:
        calls = []
        real = decode_layer.step
        decode_layer.step = lambda *a, **k: calls.append(a[1].shape) or real(*a, **k)
        try:
            fast_b, fast_s = greedy(m, ids, mask=mask), greedy(m, short)
        finally:
            decode_layer.step = real
        assert (3, 1, 64) in calls and (1, 3, 64) in calls
        own_forward(m)
        assert torch.equal(fast_b, greedy(m, ids, mask=mask)) and torch.equal(fast_s, greedy(m, short))
    finally:
        m.sparseferry.close()


def test_quantized_values_take_the_fast_step_with_the_same_kernels(tmp_path):
    from sparseferry.convert import convert

    src, _ = make_checkpoint("qwen2", tmp_path)  # attention biases
    dst = tmp_path / "int8"
    convert(src.parent / "qwen2", dst, values="int8", progress=False)
    ids = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(3))
    m = sparseferry.load(dst)
    try:
        fast = greedy(m, ids)
        assert all(layer._sf_layer_checked for layer in m.model.layers)
        own_forward(m)
        assert torch.equal(fast, greedy(m, ids))
    finally:
        m.sparseferry.close()


def test_a_layer_whose_fast_step_disagrees_keeps_its_own_forward(tmp_path, monkeypatch):
    ckpt, _ = make_checkpoint("llama", tmp_path)
    ids = torch.randint(0, 250, (1, 10), generator=torch.Generator().manual_seed(4))
    m = sparseferry.load(ckpt)
    try:
        own_forward(m)
        want = greedy(m, ids)
        m.sparseferry.close()
        m = sparseferry.load(ckpt)
        monkeypatch.setattr(native, "silu_mul_bf16", lambda g, u: torch.zeros_like(g))  # a wrong step
        got = greedy(m, ids)
        assert not any("forward" in layer.__dict__ for layer in m.model.layers)  # checked once, then their own
        assert torch.equal(got, want)
    finally:
        m.sparseferry.close()


def test_calls_it_does_not_cover_run_the_layers_own_forward(tmp_path):
    ckpt, _ = make_checkpoint("llama", tmp_path)
    m = sparseferry.load(ckpt)
    try:
        layer = m.model.layers[0]
        h = bf16(1, 1, 64)
        assert decode_layer._inputs(layer, (h,), {"cache": None}) is None  # no cache
        assert decode_layer._inputs(layer, (h.float(),), {}) is None
        assert decode_layer._inputs(layer, (h,), {"output_attentions": True}) is None
        assert decode_layer._inputs(layer, (bf16(1, 64, 64),), {}) is None  # a prefill beyond the fused batch
        cos = bf16(1, 1, layer.self_attn.head_dim)
        covered = {"cache": transformers_cache(m), "position_embeddings": (cos, cos)}
        assert decode_layer._inputs(layer, (h,), covered) is not None
        with torch.enable_grad():  # the native pieces have no backward
            assert decode_layer._inputs(layer, (h.clone().requires_grad_(),), covered) is None
    finally:
        m.sparseferry.close()
    assert not decode_layer.patchable(torch.nn.Linear(2, 2))
