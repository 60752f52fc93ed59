"""Load the model a config names, for export, chat and serve.

Two kinds of config name a model:
* a training config: `output_dir` holds the finished run (adapter, bottleneck or full model);
* LLaMA-Factory's export / inference YAML, without `output_dir`: `model_name_or_path`, optionally
  with `adapter_name_or_path` (comma-separated LoRA folders applied in order; all but the last are
  merged into the base, and the last stays a PEFT adapter unless merge_all, as LLaMA-Factory does).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1tune.config import RunConfig
from r1tune.data.templates import apply_template_choice
from r1tune.errors import UserError
from r1tune.models.bottleneck import CONFIG as BOTTLENECK_CONFIG
from r1tune.models.loading import ensure_tiny_model, load_model, load_tokenizer, read_adapter_base, resolve_model_path
from r1tune.models.methods import load_lora, merge_adapters, require_adapter_folders
from r1tune.models.quantize import is_quantized, quantization_config
from r1tune.models.run_loading import check_mergeable, load_run, read_bottleneck_base

TRAINED_MARKERS = ("r1tune_config.yaml", "adapter_config.json", "config.json", BOTTLENECK_CONFIG)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class Configured:
    model: Any
    tokenizer: Any
    base: str  # the base model (path resolved, or hub id) the weights started from
    run_dir: Path | None  # the finished run, or None for a LLaMA-Factory-style config
    label: str  # a short name: the run folder, the last adapter folder, or the base
    adapters: list[str] = field(default_factory=list)  # adapter_name_or_path folders, in order (no run)


def load_configured(cfg: RunConfig, quantized: bool = True, merge_all: bool = False) -> Configured:
    """The model and tokenizer `cfg` names. quantized: a QLoRA run or `quantization_bit` loads its base
    quantized (False: full precision, e.g. to merge). merge_all: merge every adapter into the base."""
    run_dir = run_folder(cfg)
    if run_dir is not None:
        return _load_run(cfg, run_dir, quantized, merge_all)
    return _load_named(cfg, quantized, merge_all)


def run_folder(cfg: RunConfig) -> Path | None:
    """output_dir when the config sets one; it must then hold a trained model, so that a run not yet
    trained is not mistaken for its base (or for the adapters it was to continue)."""
    if not cfg.output_dir:
        return None
    folder = Path(cfg.output_dir)
    if not any((folder / name).is_file() for name in TRAINED_MARKERS):
        raise UserError(f"output_dir '{folder}' holds no trained model (no r1tune_config.yaml, adapter_config.json or "
                        "config.json); run 'r1tune train' with this config first, or remove output_dir to load "
                        "model_name_or_path (with adapter_name_or_path)")
    return folder


def _load_run(cfg: RunConfig, run_dir: Path, quantized: bool, merge_all: bool) -> Configured:
    if merge_all:
        check_mergeable(run_dir)
    model, tokenizer = load_run(str(run_dir), quantized)
    base = read_adapter_base(run_dir) or read_bottleneck_base(run_dir) or cfg.model_name_or_path
    if merge_all and hasattr(model, "peft_config"):
        if is_quantized(model):
            raise UserError(f"'{run_dir}' was trained over a quantized base (QLoRA), which its adapter cannot be "
                            "merged into; load it unmerged, or in full precision to merge it")
        model = model.merge_and_unload()
    return Configured(model, tokenizer, resolve_model_path(base), run_dir, run_dir.name)


def _load_named(cfg: RunConfig, quantized: bool, merge_all: bool) -> Configured:
    ensure_tiny_model(cfg.model_name_or_path, cfg.tiny_arch)
    base = resolve_model_path(cfg.model_name_or_path)
    folders = require_adapter_folders(cfg.adapter_name_or_path)
    for folder in folders[:-1] + (folders[-1:] if merge_all else []):
        check_mergeable(Path(folder))
    quantization = quantization_config(cfg.quantization_bit, cfg.quantization_type, cfg.double_quantization) \
        if quantized else None
    if quantization is not None and (len(folders) > 1 or merge_all and folders):
        raise UserError(f"{cfg.source}: 'quantization_bit' loads the base quantized, and adapters cannot be merged "
                        "into a quantized base; give a single adapter_name_or_path or remove quantization_bit")
    warn_other_base(folders, base)
    tokenizer = _tokenizer(cfg, folders, base)
    model = load_model(base, trust_remote_code=cfg.trust_remote_code,
                       attn_implementation=cfg.attn_implementation, quantization=quantization)
    model = merge_adapters(model, folders[:-1])
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:  # the last adapter added tokens
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # its saved rows fill them
    if folders:
        model = load_lora(model, folders[-1])
        model = model.merge_and_unload() if merge_all else model
    label = Path(folders[-1]).resolve().name if folders else Path(base).name
    return Configured(model, tokenizer, base, None, label, folders)


def warn_other_base(folders: list[str], base: str) -> None:
    """Only a warning: adapters record the base's path at training time, and users move folders."""
    for folder in folders:
        recorded = read_adapter_base(Path(folder))
        if recorded and resolve_model_path(recorded) != base:
            print(f"warning: adapter '{folder}' was trained over '{recorded}', not model_name_or_path '{base}'; "
                  "loading it over model_name_or_path", file=sys.stderr)


def _tokenizer(cfg: RunConfig, folders: list[str], base: str):
    """The last adapter's tokenizer when it saved one (it may hold added tokens), else the base's,
    with the config's chat template."""
    last = Path(folders[-1]) if folders else None
    if last is not None and any((last / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = load_tokenizer(str(last), cfg.trust_remote_code, is_model_dir=False)
    else:
        tokenizer = load_tokenizer(base, cfg.trust_remote_code)
    apply_template_choice(tokenizer, cfg.template, cfg.source, needs_template=False)
    return tokenizer
