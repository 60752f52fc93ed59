"""SDPA through torch's fused CPU kernel for attention whose value heads are narrower than q/k (MLA).

DeepSeek-V3's multi-head latent attention has query/key heads wider than its value heads
(192 vs 128; the tiny model 48 vs 32). torch's fused CPU attention kernel needs one head
width for q, k and v, so `scaled_dot_product_attention` falls back to its math path, which
keeps every head's full score and probability matrices for the backward pass. One bf16
forward+backward of a 1,024-token sequence of the tiny model: 104 MB vs 13 MB fused; with
DeepSeek-V3's widths (16 heads, 2,048 tokens) 1,003 vs 162 MB, and 2-4x faster (bench/mla_attention.py).

Padding v with zeros to the q/k width and cutting the output back gives the same numbers
(a zero column of v contributes only a zero output column) through the fused kernel.
On CUDA, where torch has a memory-efficient kernel for unequal widths, nothing changes.
"""

from __future__ import annotations

import torch.nn.functional as F

NAME = "sdpa_padded_v"


def padded_value_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with v zero-padded to q's head width on CPU."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    width, v_width = query.shape[-1], value.shape[-1]
    if value.device.type != "cpu" or v_width >= width:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out, weights = sdpa_attention_forward(module, query, key, F.pad(value, (0, width - v_width)),
                                          attention_mask, **kwargs)
    return out[..., :v_width], weights  # (batch, seq, heads, head width)


def register() -> None:
    """Make NAME a transformers attention implementation with SDPA's mask format."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, padded_value_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def has_narrow_values(config) -> bool:
    """True when the model's value heads are narrower than its query/key heads (MLA)."""
    v_width = getattr(config, "v_head_dim", None)
    qk_width = getattr(config, "qk_head_dim", None)
    return bool(v_width and qk_width and v_width < qk_width)


def use_fused_cpu_attention(model) -> bool:
    """Switch an SDPA model with narrow value heads to NAME; True if switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not has_narrow_values(model.config):
        return False
    register()
    model.set_attn_implementation(NAME)
    return True


def mask_format(attn_implementation: str | None) -> str:
    """The attention mask form an implementation takes: NAME takes SDPA's."""
    name = attn_implementation or "eager"
    return "sdpa" if name == NAME else name
