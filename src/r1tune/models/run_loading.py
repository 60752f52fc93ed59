"""Loading a finished run: an r1tune output dir (or a model folder) back into (model, tokenizer).

The one place that reads what training left in its output dir: the saved run config, the base
an adapter (PEFT or bottleneck) was trained over, the quantization it trained with (QLoRA), and
whether its adapter can be merged. chat, serve, eval and export all load runs through here.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from r1tune.errors import UserError
from r1tune.models.bottleneck import CONFIG as BOTTLENECK_CONFIG
from r1tune.models.bottleneck import load_bottleneck
from r1tune.models.loading import load_model, load_tokenizer, read_adapter_base
from r1tune.models.methods import load_lora, merge_adapters, merged_adapters
from r1tune.models.quantize import quantization_config


def load_run(folder: str, quantized: bool = True):
    """(model, tokenizer) from an r1tune output dir: base + PEFT adapter (LoRA, AdaLoRA, virtual tokens),
    base + bottleneck adapters, or a full model. A QLoRA adapter gets its base quantized as in training
    (quantized=False: in full precision, e.g. to merge it)."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"'{folder}' is not a folder; pass an r1tune output_dir or a model folder")
    bottleneck = read_bottleneck_base(path)
    base = read_adapter_base(path) or bottleneck
    tokenizer = load_tokenizer(str(path), is_model_dir=base is None)
    if base is None:
        return load_model(str(path)), tokenizer
    run = training_config(path)
    model = load_model(base, quantization=training_quantization(run) if quantized else None)
    model = merge_adapters(model, merged_adapters(run.get("adapter_name_or_path"), run.get("create_new_adapter", False)))
    if bottleneck:
        return load_bottleneck(model, path), tokenizer
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:  # domain tokens were added
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the adapter holds the new rows
    return load_lora(model, str(path)), tokenizer


def read_bottleneck_base(folder: Path) -> str | None:
    config = folder / BOTTLENECK_CONFIG
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{config}: not a valid bottleneck adapter config; re-save the adapter") from None


def training_config(folder: Path) -> dict:
    """The run config saved with an output dir ({} for a folder r1tune did not write)."""
    saved = folder / "r1tune_config.yaml"
    return (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}) if saved.is_file() else {}


def training_quantization(raw: dict):
    """The BitsAndBytesConfig a run trained over (QLoRA), or None."""
    if not raw.get("quantization_bit"):
        return None
    import torch

    compute = torch.bfloat16 if raw.get("bf16") else torch.float32
    return quantization_config(raw["quantization_bit"], raw.get("quantization_type", "nf4"),
                               raw.get("double_quantization", True), compute)


def check_mergeable(folder: Path) -> None:
    """UserError unless `folder` holds weights a merge can fold into the base (a LoRA-type adapter or a
    full model): bottleneck adapters and virtual tokens are not weights of the base."""
    if (folder / BOTTLENECK_CONFIG).is_file():
        raise UserError(f"'{folder}' holds bottleneck adapters, which add a nonlinear block and cannot be merged into "
                        "the base weights; serve the base model with the adapter folder instead (r1tune serve/chat)")
    peft_type = (_read_json(folder / "adapter_config.json") or {}).get("peft_type", "")
    if peft_type in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"):
        raise UserError(f"'{folder}' holds a {peft_type.lower()} adapter: virtual tokens are not weights and cannot be "
                        "merged into the base; serve the base with the adapter folder instead (r1tune serve/chat)")
    if not (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise UserError(f"'{folder}' holds no trained model (no adapter_config.json or config.json); "
                        "run 'r1tune train' first or point output_dir at a finished run")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (ValueError, OSError):
        return None
