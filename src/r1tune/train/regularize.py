"""Regularisation applied through hooks: embedding / attention / FFN dropout and NEFTune noise.

Hugging Face decoders have an attention-dropout setting but no embedding or MLP dropout,
so those are forward hooks on the input embeddings and on each decoder layer's `mlp`
(dense or MoE). Every hook acts only while the module is in training mode, so
evaluation, generation and saved models are untouched.

NEFTune (Jain et al. 2023) adds uniform noise of scale alpha / sqrt(L x d) to the input
embeddings while training, L the padded sequence length and d the hidden size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def apply_regularisation(model: nn.Module, cfg) -> list[str]:
    """Install what cfg asks for; returns a description of each piece (for the run log)."""
    done = []
    if cfg.attention_dropout is not None:
        count = set_attention_dropout(model, cfg.attention_dropout)
        done.append(f"attention dropout {cfg.attention_dropout} ({count} layers)")
    embeddings = model.get_input_embeddings()
    if cfg.embedding_dropout:
        embeddings.register_forward_hook(_dropout_hook(cfg.embedding_dropout))
        done.append(f"embedding dropout {cfg.embedding_dropout}")
    if cfg.neftune_noise_alpha:
        embeddings.register_forward_hook(_neftune_hook(cfg.neftune_noise_alpha))
        done.append(f"NEFTune noise alpha {cfg.neftune_noise_alpha}")
    if cfg.ffn_dropout:
        blocks = mlp_blocks(model)
        for block in blocks:
            block.register_forward_hook(_dropout_hook(cfg.ffn_dropout))
        done.append(f"FFN dropout {cfg.ffn_dropout} ({len(blocks)} layers)")
    return done


def set_attention_dropout(model: nn.Module, p: float) -> int:
    """Set the dropout on attention probabilities of every attention module that has one."""
    count = 0
    for name, module in model.named_modules():
        if name.endswith("self_attn") and hasattr(module, "attention_dropout"):
            module.attention_dropout = p
            count += 1
    model.config.attention_dropout = p  # saved with a full model, so a reload trains the same way
    return count


def mlp_blocks(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's MLP / MoE block (the module named `<layer>.mlp`)."""
    return [m for n, m in model.named_modules() if n.endswith(".mlp") and ".layers." in f".{n}"]


def _dropout_hook(p: float):
    def hook(module, args, output):
        return F.dropout(output, p=p, training=True) if module.training else None
    return hook


def _neftune_hook(alpha: float):
    def hook(module, args, output):
        if not module.training:
            return None
        scale = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.zeros_like(output).uniform_(-scale, scale)
    return hook
