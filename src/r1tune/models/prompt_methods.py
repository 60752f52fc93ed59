"""Virtual-token methods through PEFT: prompt tuning, prefix tuning, P-tuning.

Prompt tuning and P-tuning prepend trainable embeddings to the input, so the logits have
`num_virtual_tokens` extra positions at the front; prefix tuning prepends trainable keys
and values to every layer's attention cache instead. The loss scores only the last
labels-width positions of the logits (train/losses.py), so the virtual ones drop out.

DeepSeek-V3 in transformers 5 caches MLA's compressed latent (one shared head of
kv_lora_rank + rope width), not per-head keys and values, so PEFT's prefix tuning has no
cache shape to fill there; r1tune says so instead of failing inside attention.
"""

from __future__ import annotations

from torch import nn

from r1tune.errors import UserError

PROMPT_TYPES = ("prompt_tuning", "prefix_tuning", "p_tuning")


def prompt_config(cfg, model_path: str, hidden_size: int):
    """The PEFT config for cfg.finetuning_type (one of PROMPT_TYPES)."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit

    common = {"task_type": "CAUSAL_LM", "num_virtual_tokens": cfg.num_virtual_tokens}
    encoder = cfg.encoder_hidden_size or hidden_size
    if cfg.finetuning_type == "prompt_tuning":
        init = {"random": PromptTuningInit.RANDOM, "text": PromptTuningInit.TEXT,
                "sample_vocab": PromptTuningInit.SAMPLE_VOCAB}[cfg.prompt_tuning_init]
        text = {"prompt_tuning_init_text": cfg.prompt_tuning_init_text, "tokenizer_name_or_path": model_path}
        return PromptTuningConfig(prompt_tuning_init=init, **(text if cfg.prompt_tuning_init == "text" else {}), **common)
    if cfg.finetuning_type == "prefix_tuning":
        return PrefixTuningConfig(prefix_projection=cfg.prefix_projection, encoder_hidden_size=encoder, **common)
    return PromptEncoderConfig(encoder_reparameterization_type=cfg.encoder_reparameterization_type,
                               encoder_hidden_size=encoder, **common)


def attach_prompt_method(model: nn.Module, cfg, model_path: str):
    from peft import get_peft_model

    if cfg.finetuning_type == "prefix_tuning" and getattr(model.config, "kv_lora_rank", None):
        raise UserError(f"{cfg.source}: prefix_tuning cannot adapt {model.config.model_type}: its attention caches a "
                        "compressed latent (MLA), not per-head keys and values; use p_tuning or prompt_tuning")
    for param in model.parameters():
        param.requires_grad = False
    return get_peft_model(model, prompt_config(cfg, model_path, model.config.hidden_size))


def is_prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)

