"""transformers' SDPA attention with two CPU fixes, registered as one attention implementation (NAME).

1. MLA's narrow value heads. DeepSeek-V3's multi-head latent attention has query/key heads wider
than its value heads (192 vs 128; the tiny model 48 vs 32). torch's fused CPU attention kernel needs
one head width for q, k and v, so `scaled_dot_product_attention` falls back to its math path, which
keeps every head's full score and probability matrices for the backward pass. One bf16
forward+backward of a 1,024-token sequence of the tiny model: 104 MB vs 13 MB fused; with
DeepSeek-V3's widths (16 heads, 2,048 tokens) 1,003 vs 162 MB, and 2-4x faster (bench/mla_attention.py).
Padding v with zeros to the q/k width and cutting the output back gives the same numbers (a zero
column of v contributes only a zero output column) through the fused kernel.

2. Short rows in training. The fused CPU kernel's backward is slow on short rows: tiny Qwen2, 16
rows of 96 tokens (GRPO's prompt + completion), LoRA, bf16 forward+backward 142 ms with it, 129 ms
with attention written out (scores, softmax in fp32, weighted values, as transformers' eager attention;
python bench/decode_step.py; 174 vs 137 ms with GRPO's loss in a profiling run), while written out
loses from 256 tokens on (1,024 tokens: 472 vs 285 ms in that run) and needs far more memory. So rows of at most SHORT_ROWS tokens are written out when gradients are on.

On other devices (CUDA has its own kernels) nothing changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sdpa_r1tune"
SHORT_ROWS = 128  # query length up to which training attention is written out on CPU


def cpu_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, with the two CPU fixes of this module."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    width, v_width = query.shape[-1], value.shape[-1]
    if value.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if (torch.is_grad_enabled() and query.shape[2] <= SHORT_ROWS and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None):
        return written_out_attention(module, query, key, value, attention_mask, **kwargs)
    if v_width >= width:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out, weights = sdpa_attention_forward(module, query, key, F.pad(value, (0, width - v_width)),
                                          attention_mask, **kwargs)
    return out[..., :v_width], weights  # (batch, seq, heads, head width)


def written_out_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """softmax(q·kᵀ·scaling + mask)·v with SDPA's inputs (bool or additive mask, or None for plain causal),
    the softmax in fp32; returns (batch, seq, heads, v head width) as SDPA's path does."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_len, kv_len = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and q_len > 1:
            keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :kv_len], torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask[..., :kv_len]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make NAME a transformers attention implementation with SDPA's mask format."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, cpu_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_cpu_attention(model) -> bool:
    """Switch a model on transformers' SDPA attention to NAME; True if switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    return True


def mask_format(attn_implementation: str | None) -> str:
    """The attention mask form an implementation takes: NAME takes SDPA's."""
    name = attn_implementation or "eager"
    return "sdpa" if name == NAME else name
