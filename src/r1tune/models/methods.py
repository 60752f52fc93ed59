"""Attach a fine-tuning method to a loaded model: LoRA (PEFT), full, or freeze.

LoRA targets are resolved here to exact module names, so what gets an adapter is
explicit and testable. On DeepSeek-V3 in transformers 5 the routed experts are fused
3-D parameters (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), adapted through
PEFT's `target_parameters` and run in low rank (expert_lora.py); the router (`mlp.gate`) is
never adapted.

PEFT >= 0.18 rewrites any target ending in gate_proj/up_proj/down_proj to the fused
experts for DeepSeek/Qwen-MoE models, which silently drops the shared experts and the
dense layers' MLP. `exact_lora_targets()` switches that rewrite off while r1tune
creates or loads an adapter whose targets are already exact.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from torch import nn

from r1tune.errors import UserError
from r1tune.models.expert_lora import EXPERT_PARAMS, use_lowrank_experts
from r1tune.models.vocab import lora_token_training


@dataclass
class LoraTargets:
    modules: list[str]      # exact names of nn.Linear modules
    parameters: list[str]   # exact names of fused expert parameters


def linear_module_names(model: nn.Module) -> list[str]:
    """Every nn.Linear inside the decoder layers (never lm_head or embeddings)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and ".layers." in f".{name}"]


def expert_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters()
            if p.dim() == 3 and name.rsplit(".", 1)[-1] in EXPERT_PARAMS and ".experts." in name]


def resolve_lora_targets(model: nn.Module, lora_target: str, include_experts: bool) -> LoraTargets:
    linears = linear_module_names(model)
    experts = expert_parameter_names(model) if include_experts else []
    key = lora_target.strip().lower()
    if key == "all":
        return LoraTargets(linears, experts)
    if key == "attention":
        return LoraTargets([n for n in linears if ".self_attn." in n], [])
    if key == "mlp":
        return LoraTargets([n for n in linears if ".mlp." in n], experts)
    return _named_targets(lora_target, linears, experts)


def _named_targets(spec: str, linears: list[str], experts: list[str]) -> LoraTargets:
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    modules, params = [], []
    for word in wanted:
        hit_modules = [n for n in linears if n == word or n.endswith("." + word)]
        hit_params = [n for n in experts if n == word or n.endswith("." + word)]
        if not hit_modules and not hit_params:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linears + experts})
            raise UserError(
                f"config key 'lora_target': no linear layer is named '{word}'; use all, attention, mlp "
                f"or names from: {', '.join(leaves)}")
        modules += hit_modules
        params += hit_params
    return LoraTargets(sorted(set(modules)), sorted(set(params)))


@contextlib.contextmanager
def exact_lora_targets():
    """Stop PEFT from remapping exact gate/up/down_proj targets onto fused MoE experts."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # older PEFT: no remapping to switch off
        yield
        return
    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


def attach_lora(model: nn.Module, rank: int, alpha: int, dropout: float, targets: LoraTargets,
                extra: dict | None = None):
    """PEFT LoRA on exactly `targets`; `extra` goes to LoraConfig (e.g. trainable_token_indices)."""
    from peft import LoraConfig, get_peft_model

    # A regex of exact names: PEFT matches it with re.fullmatch, so nothing else is caught.
    pattern = "|".join(re.escape(n) for n in targets.modules) or "^$"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern,
                        target_parameters=targets.parameters or None, task_type="CAUSAL_LM", **(extra or {}))
    with exact_lora_targets():
        model = get_peft_model(model, config)
    use_lowrank_experts(model)
    return model


def load_lora(model: nn.Module, adapter_dir: str, trainable: bool = False):
    from peft import PeftModel

    with exact_lora_targets():
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    use_lowrank_experts(model)
    return model


def freeze_all_but_top_layers(model: nn.Module, n_layers: int) -> None:
    """Train only the last n decoder layers (the first |n| when n is negative)."""
    indices = sorted({int(m.group(1)) for name, _ in model.named_parameters()
                      if (m := re.search(r"\.layers\.(\d+)\.", name))})
    if not indices or n_layers == 0 or abs(n_layers) > len(indices):
        raise UserError(
            f"config key 'freeze_trainable_layers' is {n_layers}; the model has {len(indices)} layers, "
            f"so use a value from 1 to {len(indices)} (or -1 to -{len(indices)} for the first layers)")
    chosen = set(indices[-n_layers:] if n_layers > 0 else indices[:-n_layers])
    for name, param in model.named_parameters():
        m = re.search(r"\.layers\.(\d+)\.", name)
        param.requires_grad = bool(m and int(m.group(1)) in chosen)


def attach_method(model: nn.Module, cfg, new_token_ids: list[int] = ()):
    """Return the model ready to train under cfg.finetuning_type (new token rows trainable too)."""
    if cfg.finetuning_type == "lora":
        for param in model.parameters():
            param.requires_grad = False
        targets = resolve_lora_targets(model, cfg.lora_target, cfg.lora_experts)
        if targets.parameters and cfg.lora_dropout > 0:
            raise UserError("config key 'lora_dropout' must be 0 when LoRA adapts the fused MoE experts "
                            "(PEFT cannot apply dropout there); set lora_dropout: 0 or lora_experts: false")
        extra = lora_token_training(list(new_token_ids), model)
        return attach_lora(model, cfg.lora_rank, cfg.effective_lora_alpha, cfg.lora_dropout, targets, extra)
    if cfg.finetuning_type == "freeze":
        freeze_all_but_top_layers(model, cfg.freeze_trainable_layers)
        if new_token_ids:  # new rows start from a mean: the embeddings must train for them to mean anything
            for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
                if layer is not None:
                    layer.weight.requires_grad = True
        return model
    for param in model.parameters():
        param.requires_grad = True
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def describe_trainable(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
