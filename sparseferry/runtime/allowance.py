"""The memory a generation needs beyond the weight budget, as a formula of batch and sequence length.

The budget bounds the weights the engine holds (resident layers, embeddings/head, streaming
buffers, scratch). What transformers' own forward and generate loop hold comes on top:

    kv          2 · L · B · S · kv_heads · head_dim · a              the KV cache at S = prompt + new tokens,
                + 2 · B · S · kv_heads · head_dim · a                one layer's cache copied while it grows
    activations B · T · (6·H + (heads + 2·kv_heads)·head_dim + 3·I) · a    one layer's hidden states, q/k/v and
                + B · heads · T · T · 4                              gated-MLP activations at the prompt
                + B · T · 2 · max(H, I) · 4 + 4 MiB                  (T tokens), attention scores in fp32,
                                                                     the fp32 input and output of one
                                                                     matmul in fp32 (kernels.linear_wide)
    logits      4 · B · V · 4                                        last-position logits in fp32, the copies
                                                                     generation's processors make
    slack       RUNTIME_SLACK                                        allocator arenas of the reader and
                                                                     decompressor threads, oneDNN scratch, page
                                                                     cache of the non-layer tensors read at load

(L layers, H hidden, I intermediate, V vocabulary, a = bytes of the activation dtype, B batch.)
`allowance(...)["total"]` is what the process may hold beyond `budget` + its footprint before
loading; benchmarks/memory_cgroup.py runs `generate` in a memory cgroup of exactly that.
"""
from __future__ import annotations

# Measured with benchmarks/memory_cgroup.py on the 1.1B synthetic model (README "Memory budget"):
# batch 1 and 8 complete with it, batch 8 is OOM-killed with 60 MiB less.
RUNTIME_SLACK = 96 << 20


def _get(cfg: dict, *keys, default=None):
    for k in keys:
        if isinstance(cfg.get(k), int):
            return cfg[k]
    return default


def allowance(config: dict, batch: int, prompt_tokens: int, new_tokens: int, dtype_bytes: int = 2) -> dict:
    """Bytes beyond the weight budget for `generate` of `batch` prompts of `prompt_tokens` + `new_tokens`.

    config: the model's config.json dict (Llama-style keys, GPT-2 / OPT aliases understood).
    Returns {"kv", "activations", "logits", "slack", "total"}.
    """
    L = _get(config, "num_hidden_layers", "n_layer", default=1)
    H = _get(config, "hidden_size", "n_embd", "d_model", default=0)
    heads = _get(config, "num_attention_heads", "n_head", default=1)
    kv_heads = _get(config, "num_key_value_heads", default=heads) or heads
    head_dim = _get(config, "head_dim", default=H // max(heads, 1))
    inter = _get(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * H) or 4 * H
    vocab = _get(config, "vocab_size", default=0)
    B, T, S, a = batch, prompt_tokens, prompt_tokens + new_tokens, dtype_bytes
    kv = 2 * L * B * S * kv_heads * head_dim * a + 2 * B * S * kv_heads * head_dim * a
    act = B * T * (6 * H + (heads + 2 * kv_heads) * head_dim + 3 * inter) * a + B * heads * T * T * 4
    act += B * T * 2 * max(H, inter) * 4 + (4 << 20)  # linear_wide: fp32 x and y of one matmul, its W chunk
    logits = 4 * B * vocab * 4
    out = {"kv": kv, "activations": act, "logits": logits, "slack": RUNTIME_SLACK}
    out["total"] = sum(out.values())
    return out


__all__ = ["RUNTIME_SLACK", "allowance"]
