"""Tiny random mixture-of-experts models of six families, and their checkpoints.

`moe_model(family)` builds the transformers model from a tiny config (random weights, experts and
attention magnitude-pruned to 50%); `moe_checkpoint(model, dst)` writes it in the checkpoint format
with every expert parameter stored per expert (docs/FORMAT.md 2b), straight from the model's own
fused parameters: what a converter writes, without the HuggingFace folder in between.
"""
from __future__ import annotations

import torch
from torch import nn

MOE_CONFIGS: dict[str, dict] = {
    "mixtral": dict(hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128),
    "qwen3_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                      decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=128),
    "deepseek_v3": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                        n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                        q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        max_position_embeddings=128, rope_scaling=None),
    "olmoe": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, max_position_embeddings=128),
    "gpt_oss": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=16, max_position_embeddings=128),
    "hunyuan_v1_moe": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, num_experts=4, moe_topk=2, num_shared_expert=1,
                           max_position_embeddings=128),
}
FAMILIES = tuple(MOE_CONFIGS)


def moe_config(family: str, **overrides):
    from transformers import AutoConfig

    kw = dict(MOE_CONFIGS[family], vocab_size=260, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def _prune_(w: torch.Tensor, sparsity: float) -> None:
    """Zero the smallest |w| of each matrix (each expert's matrix on its own)."""
    mats = w.view(-1, *w.shape[-2:]) if w.dim() == 3 else w.view(1, *w.shape)
    for m in mats:
        k = int(m.numel() * sparsity)
        if k:
            idx = m.abs().flatten().argsort()[:k]
            m.view(-1)[idx] = 0


def moe_model(family: str, *, dtype=torch.float32, seed: int = 0, sparsity: float = 0.5, **overrides) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = moe_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "lm_head" not in name and p.shape[0] != _num_experts(model, p):
                _prune_(p.data, sparsity)
            elif p.dim() == 3:
                _prune_(p.data, sparsity)
    return model


def _num_experts(model, p) -> int:
    """The router weight [E, H] stays dense (it is tiny and decides everything)."""
    for m in model.modules():
        if getattr(m, "weight", None) is p and p.dim() == 2:
            return -1
    return -2


def moe_checkpoint(model: nn.Module, dst, *, values: str | None = None, group_size: int = 128):
    """Write `model` as a checkpoint: expert parameters per expert, 2-D layer weights bitmap-encoded."""
    from sparseferry.hf import model_info
    from sparseferry.store import CheckpointWriter, layer_file, prepare, prepare_experts

    info = model_info(model)
    sd = model.state_dict()
    experts = {f"{n}.{leaf}" for n, m in model.named_modules() if hasattr(m, "has_gate") and hasattr(m, "num_experts")
               for leaf, _ in m.named_parameters(recurse=False)}
    linear = set(info.linear_weights)
    names = [n for n in info.param_names if n not in info.tied]
    with CheckpointWriter(dst, config=model.config.to_dict(), architecture=type(model).__name__,
                          layers_prefix=info.layers_prefix, num_layers=info.num_layers, tied=dict(info.tied)) as w:
        for i in range(info.num_layers):
            tensors = []
            for n in info.layer_params(i):
                t = sd[n].contiguous()
                if n in experts:
                    tensors.append(prepare_experts(n, t, True, values=values, group_size=group_size))
                else:
                    tensors.append(prepare(n, t, n in linear, values=values if n in linear else None,
                                           group_size=group_size))
            w.write_file(layer_file(i), tensors, i)
        w.write_file("extra.safetensors", [prepare(n, sd[n].contiguous(), False) for n in names
                                           if info.layer_of(n) is None], None)
        w.commit()
    return dst


# Other families with fused experts, built from one set of generic tiny settings (each key applied
# only where the family's config has it): the sweep checks them without any per-family choice.
SWEEP_FAMILIES = ("qwen2_moe", "phimoe", "granitemoe", "minimax", "ernie4_5_moe", "glm4_moe", "deepseek_v2", "flex_olmo")
_GENERIC = dict(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_local_experts=4,
                n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2, moe_k=2, top_k=2, first_k_dense_replace=0,
                n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                v_head_dim=16, decoder_sparse_step=1, moe_layer_freq=1, mlp_only_layers=[])


def generic_moe_model(model_type: str, *, seed: int = 0) -> nn.Module:
    import transformers
    from transformers import AutoConfig

    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
              vocab_size=260, max_position_embeddings=128, head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    defaults = AutoConfig.for_model(model_type)
    kw.update({k: v for k, v in _GENERIC.items() if hasattr(defaults, k)})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:
                _prune_(p.data, 0.5)
    return model.eval()
