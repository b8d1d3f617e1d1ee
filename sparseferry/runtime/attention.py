"""Attention of a decode step on the CPU: grouped-query heads packed, not broadcast.

transformers' SDPA path hands torch `enable_gqa=True` whenever there is no mask (every decode step
of one sequence); on the CPU that runs the math kernel over broadcast key/value heads, ~280 us a
layer for a 1.1B Llama against ~50 us for the same attention with the query heads of each key/value
head packed as rows of one query ([b, kv_heads, groups, d]): the packing transformers itself uses
when a mask is given (`pack_gqa`). `sparseferry_sdpa` does that packing for every single-token
query on the CPU and hands everything else to transformers' own `sdpa_attention_forward`
unchanged; its masks are SDPA's (`sdpa_mask`). `load` selects it on the CPU where the model would
use "sdpa" and the caller did not choose an implementation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sparseferry_sdpa"
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias")  # the general path handles (or refuses) these


def sparseferry_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                     **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    b, h, q_len, d = query.shape
    packable = (q_len == 1 and groups > 1 and query.device.type == "cpu" and dropout == 0.0
                and key.shape[1] * groups == h and key.shape[-1] == value.shape[-1] == d
                and not kwargs.get("output_attentions", False)
                and all(kwargs.get(k) is None for k in _UNSUPPORTED)
                and (attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] in (1, h))))
    if not packable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return packed_step(query.transpose(1, 2), key, value, attention_mask, scaling), None


def packed_step(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                scaling: float | None) -> torch.Tensor:
    """SDPA of a single-token query q [b, 1, h, d] against key / value [b, kvh, s, d] with the query
    heads of each key/value head packed as rows; mask None or [b, 1 or h, 1, s]. Returns [b, 1, h, d]."""
    b, _, h, d = q.shape
    kvh = key.shape[1]
    groups = h // kvh
    q = q.reshape(b, kvh, groups, d)  # head i attends with key/value head i // groups (repeat_kv's order)
    if mask is not None and mask.shape[1] == h:
        mask = mask.reshape(b, kvh, groups, mask.shape[-1])
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)  # [b, kvh, groups, d]
    return out.reshape(b, 1, h, d)


def register() -> str:
    """Make NAME an attention implementation transformers knows (idempotent); returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sparseferry_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
