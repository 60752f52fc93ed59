"""Attach a fine-tuning method to a loaded model: LoRA and its variants, AdaLoRA, virtual tokens,
bottleneck adapters, full, or freeze.

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
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from r1tune.errors import UserError
from r1tune.models.adalora import adalora_config
from r1tune.models.bottleneck import BottleneckConfig, attach_bottleneck
from r1tune.models.expert_lora import EXPERT_PARAMS, use_lowrank_experts
from r1tune.models.prompt_methods import PROMPT_TYPES, attach_prompt_method
from r1tune.models.run_state import MethodState
from r1tune.models.unfreeze import freeze_layers, layer_indices
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

    try:
        with exact_lora_targets():
            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    except (RuntimeError, ValueError) as exc:  # an adapter of another base: shapes or module names differ
        reason = next((line.strip() for line in str(exc).splitlines()
                       if "size mismatch" in line or "not found in the base model" in line), None)
        if reason is None:
            raise
        raise UserError(f"adapter '{adapter_dir}' does not fit this base model ({reason.split(': copying')[0][:200]}); "
                        "load it over the base model it was trained on") from None
    use_lowrank_experts(model)
    return model


def lora_variant_options(cfg) -> dict:
    """LoraConfig kwargs for DoRA / rsLoRA / PiSSA initialisation."""
    extra = {"use_dora": cfg.use_dora, "use_rslora": cfg.use_rslora}
    if cfg.pissa_init:
        extra["init_lora_weights"] = "pissa" if cfg.pissa_iter == -1 else f"pissa_niter_{cfg.pissa_iter}"
    return extra


def additional_modules(model: nn.Module, spec: str | None) -> list[str]:
    """additional_target names checked against the model: modules trained in full and saved with the adapter."""
    words = [w.strip() for w in (spec or "").split(",") if w.strip()]
    names = [n for n, _ in model.named_modules()]
    for word in words:
        if not any(n == word or n.endswith("." + word) for n in names):
            raise UserError(f"config key 'additional_target': the model has no module named '{word}'; "
                            "use e.g. embed_tokens, lm_head or norm")
    return words


def attach_lora_method(model: nn.Module, cfg, new_token_ids=(), state: MethodState | None = None):
    """LoRA per cfg: variants, additional targets, continuing or stacking on existing adapters.
    PiSSA's start adapter goes in `state` (without one, nothing could convert the result on save)."""
    for param in model.parameters():
        param.requires_grad = False
    model, continued = apply_existing_adapters(model, cfg)
    if continued:  # the adapter keeps its own rank, targets and variant
        return model
    targets = resolve_lora_targets(model, cfg.lora_target, cfg.adapt_experts)
    if targets.parameters and cfg.lora_dropout > 0:
        raise UserError("config key 'lora_dropout' must be 0 when LoRA adapts the fused MoE experts "
                        "(PEFT cannot apply dropout there); set lora_dropout: 0 or lora_experts: false")
    extra = {**lora_token_training(list(new_token_ids), model), **lora_variant_options(cfg)}
    saved = additional_modules(model, cfg.additional_target)
    if cfg.train_router:  # the router is no LoRA target: train (and save) a full copy of it
        saved.append("gate")
    if saved:
        extra["modules_to_save"] = saved
        trained_rows = extra.get("trainable_token_indices", {})
        for name in list(trained_rows):  # a module trained in full needs no trained rows
            if any(name == w or name.endswith("." + w) for w in saved):
                trained_rows.pop(name)
    model = attach_lora(model, cfg.lora_rank, cfg.effective_lora_alpha, cfg.lora_dropout, targets, extra)
    if cfg.pissa_init and state is not None:
        state.pissa_start = save_pissa_start(model)
    return model


def adapter_folders(spec: str | None) -> list[str]:
    return [f.strip() for f in (spec or "").split(",") if f.strip()]


def require_adapter_folders(spec: str | None) -> list[str]:
    """adapter_name_or_path's folders, each checked to hold a PEFT adapter."""
    folders = adapter_folders(spec)
    for folder in folders:
        if not (Path(folder) / "adapter_config.json").is_file():
            raise UserError(f"config key 'adapter_name_or_path': '{folder}' is not a LoRA adapter folder "
                            "(no adapter_config.json); give the folder a LoRA run saved to")
    return folders


def merged_adapters(spec: str | None, create_new: bool) -> list[str]:
    """The adapter_name_or_path folders merged into the base before training (and so before serving)."""
    folders = adapter_folders(spec)
    return folders if create_new else folders[:-1]


def merge_adapters(model: nn.Module, folders: list[str]) -> nn.Module:
    for folder in folders:
        model = load_lora(model, folder).merge_and_unload()
    return model


def apply_existing_adapters(model: nn.Module, cfg):
    """adapter_name_or_path: merge all but the last adapter (all with create_new_adapter) into the base;
    the last one otherwise keeps training. Returns (model, True when an adapter is being continued)."""
    folders = require_adapter_folders(cfg.adapter_name_or_path)
    merge = merged_adapters(cfg.adapter_name_or_path, cfg.create_new_adapter)
    if merge and cfg.quantization_bit:
        raise UserError("config key 'adapter_name_or_path': adapters cannot be merged into a quantized base "
                        "(quantization_bit); give one adapter to continue, or merge them in full precision first")
    model = merge_adapters(model, merge)
    if len(merge) == len(folders):
        return model, False
    return load_lora(model, folders[-1], trainable=True), True


def save_pissa_start(model) -> Path:
    """PiSSA's starting adapter saved to a temp folder, so that the final one can be converted to plain
    LoRA on the original base (save it with that folder; saving removes it)."""
    start = Path(tempfile.mkdtemp(prefix="r1tune-pissa-"))
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True  # saved as a plain LoRA start
    with exact_lora_targets():
        model.save_pretrained(start)
    config.init_lora_weights = init
    return start


def attach_method(model: nn.Module, cfg, new_token_ids: list[int] = (), total_steps: int | None = None,
                  model_path: str | None = None, state: MethodState | None = None):
    """Return the model ready to train under cfg.finetuning_type (new token rows trainable too);
    what the rest of the run needs from the method goes in `state`."""
    kind = cfg.finetuning_type
    if kind == "lora":
        model = attach_lora_method(model, cfg, new_token_ids, state)
    elif kind == "adalora":
        model = _attach_adalora(model, cfg, total_steps)
    elif kind in PROMPT_TYPES:
        model = attach_prompt_method(model, cfg, model_path or model.config._name_or_path)
    elif kind == "bottleneck":
        model = attach_bottleneck(model, BottleneckConfig(cfg.bottleneck_size, cfg.bottleneck_where,
                                                          cfg.bottleneck_activation))
    elif kind == "freeze":
        if cfg.unfreeze_schedule is None:
            freeze_layers(model, cfg.freeze_trainable_layers, cfg.freeze_trainable_modules, cfg.freeze_extra_modules)
        else:  # every decoder-layer weight is a candidate; the schedule decides when each trains
            freeze_layers(model, len(layer_indices(model)), cfg.freeze_trainable_modules, cfg.freeze_extra_modules)
    else:
        for param in model.parameters():
            param.requires_grad = True
    if new_token_ids and kind not in ("lora", "full"):  # new rows start from a mean: they must train
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is not None:
                layer.weight.requires_grad = True
    return model


def _attach_adalora(model: nn.Module, cfg, total_steps: int | None):
    from peft import get_peft_model

    for param in model.parameters():
        param.requires_grad = False
    targets = resolve_lora_targets(model, cfg.lora_target, include_experts=False)
    config = adalora_config(cfg, targets, total_steps or 1)
    if saved := additional_modules(model, cfg.additional_target):
        config.modules_to_save = saved
    with exact_lora_targets():
        return get_peft_model(model, config)


def count_parameters(model: nn.Module, trained_share: dict[str, float] | None = None) -> tuple[int, int]:
    """(trainable, total) weights: 4-bit layers count their unpacked size; a parameter named in
    trained_share (MethodState's: fused MoE tensors with gradients masked per expert) counts that share."""
    share = trained_share or {}
    trainable = sum(_unpacked_numel(p) * share.get(n, 1.0) for n, p in model.named_parameters() if p.requires_grad)
    total = sum(_unpacked_numel(p) for p in model.parameters())
    return round(trainable), total


def _unpacked_numel(param) -> int:
    state = getattr(param, "quant_state", None)  # bitsandbytes packs two 4-bit weights per byte
    return state.shape.numel() if state is not None and hasattr(state, "shape") else param.numel()


def describe_trainable(model: nn.Module, trained_share: dict[str, float] | None = None) -> str:
    trainable, total = count_parameters(model, trained_share)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
