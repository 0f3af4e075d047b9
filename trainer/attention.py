"""Varlen attention for packed rows without a varlen kernel: one causal sdpa call per example.

A packed row of examples [300, 150, 60] needs only (300² + 150² + 60²) / 2 query-key pairs, not
the 512² / 2 a block-diagonal mask still computes. Registered with transformers as the
``realm_packed`` attention implementation; the engine passes the example spans of every row as
the ``realm_segments`` keyword, which transformers hands to the attention function. Each span
runs ``scaled_dot_product_attention(is_causal=True)`` (flash kernels on CPU and CUDA, no mask
materialised); padding at the end of a row gets zeros (its labels are ignored). Without
``realm_segments`` it falls back to transformers' sdpa, so the same model still runs unpacked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "realm_packed"


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs):
    segments = kwargs.get("realm_segments")
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    batch, heads, length, dim = query.shape
    gqa = key.shape[1] != heads
    rows = []
    for b, spans in enumerate(segments):
        parts, end = [], 0
        for start, stop in spans:
            parts.append(F.scaled_dot_product_attention(
                query[b:b + 1, :, start:stop], key[b:b + 1, :, start:stop],
                value[b:b + 1, :, start:stop], is_causal=True, scale=scaling,
                dropout_p=dropout if module.training else 0.0, enable_gqa=gqa))
            end = stop
        if end < length:
            parts.append(query.new_zeros(1, heads, length - end, value.shape[-1]))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None  # spans replace the mask


AttentionInterface.register(NAME, packed_attention)
AttentionMaskInterface.register(NAME, _no_mask)


def use_packed_attention(model) -> None:
    """Switch a loaded model to the span-wise attention (the sdpa fallback stays available)."""
    model.set_attn_implementation(NAME)
