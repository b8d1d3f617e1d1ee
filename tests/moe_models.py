"""Tiny random mixture-of-experts models of every family transformers knows, saved as published.

    folder, model = make_tiny_moe("mixtral", tmp_path)

`save_pretrained` writes what published checkpoints hold: one tensor per expert where the family
publishes them so (transformers reverses its own conversion mapping on save), fused `[E, ...]`
tensors where the family's checkpoints are fused (gpt-oss, GraniteMoE, DBRX, Llama-4, JetMoE).
Every matrix in the decoder layers (experts, attention, routers, shared experts) is magnitude-pruned
to `sparsity`, so the bitmap encoding has something to do.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from conftest import VOCAB, TinyModel, magnitude_prune_, write_tokenizer

# One small size for every family: 2 layers, hidden 64, 4 heads, 4 experts (top-2), 1 shared expert,
# MLA ranks of 16 (DeepSeek), dense-first-layers off. Keys a family does not have are not passed.
TINY = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
            num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_topk=2,
            n_shared_experts=1, shared_expert_intermediate_size=32, kv_lora_rank=16, q_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=0, n_group=1,
            topk_group=1, d_model=64, n_heads=4, n_layers=2, ffn_hidden_size=64, max_seq_len=128,
            pad_token_id=258, bos_token_id=256, eos_token_id=257)
# Families whose sub-configs or layer pattern need their own small values.
SPECIAL = {
    "dbrx": dict(attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                 ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2, "hidden_size": 64}),
    # attention and Mamba layers alternate, experts on every other layer: decoder layers of two classes
    "jamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1, mamba_d_state=8, mamba_dt_rank=8),
    "jetmoe": dict(kv_channels=16, num_key_value_heads=4),
}
# The MoE families named in the documentation, tested one by one; `moe_model_types()` is the sweep.
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
            "gpt_oss", "hunyuan_v1_moe", "granitemoe", "llama4_text", "jetmoe", "dbrx", "jamba")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "ffn_config")


def tiny_moe_config(model_type: str, **overrides):
    """A small config of `model_type` (see TINY); raises whatever transformers raises if it cannot be built."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        defaults = cls().to_dict()
    kw = {k: v for k, v in TINY.items() if k in defaults}
    if "head_dim" in defaults and "qk_rope_head_dim" not in defaults:
        kw["head_dim"] = 16
    kw.update(SPECIAL.get(model_type, {}), **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**kw)


def moe_model_types() -> list[str]:
    """Every causal-LM model type whose default config has experts."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for mt in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                d = CONFIG_MAPPING[mt]().to_dict()
        except Exception:  # noqa: BLE001 - a config that cannot even be built with its defaults
            continue
        if any(d.get(k) for k in _EXPERT_KEYS):
            out.append(mt)
    return out


def meta_param_count(config) -> int:
    """Parameters of the causal LM for `config`, counted on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def make_tiny_moe(model_type: str, tmp_path, *, sparsity: float | None = 0.5, dtype: torch.dtype = torch.bfloat16,
                  seed: int = 0, name: str | None = None, max_shard_size: str | None = None, tokenizer: bool = False,
                  **overrides) -> TinyModel:
    """Build a tiny random `model_type` MoE causal LM, prune its layer matrices, `save_pretrained` it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = tiny_moe_config(model_type, **overrides)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if sparsity is not None:
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        skip = {id(head.weight) if head is not None else None, id(emb.weight)}
        for _, p in model.named_parameters():
            if p.dim() >= 2 and id(p) not in skip and p.is_floating_point():
                for m in (p.data.view(-1, *p.shape[-2:]) if p.dim() > 2 else [p.data]):
                    magnitude_prune_(m, sparsity)  # per matrix: each expert on its own
    folder = Path(tmp_path) / (name or model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    if tokenizer:
        write_tokenizer(folder)
    return TinyModel(folder, model)
