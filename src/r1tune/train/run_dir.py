"""A run's output folder over its life: checked before anything is written, cleared for a fresh run,
trimmed back to the checkpoint a resumed run starts from, and given the final model. Shared by every
stage; nothing here knows which stage is training."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from r1tune.config import RunConfig, config_to_yaml
from r1tune.errors import UserError
from r1tune.fileio import atomic_dir
from r1tune.models.bottleneck import CONFIG as BOTTLENECK_CONFIG
from r1tune.models.bottleneck import WEIGHTS as BOTTLENECK_WEIGHTS
from r1tune.models.bottleneck import has_bottleneck, save_bottleneck
from r1tune.models.expert_selection import EXPERT_LOAD_FILE
from r1tune.models.methods import exact_lora_targets
from r1tune.models.value_head import VALUE_HEAD_FILE
from r1tune.train.checkpoint import list_checkpoints
from r1tune.train.logs import SAMPLES_FILE, truncate_log_after

FINISHED_MARKERS = ("adapter_config.json", "model.safetensors", "r1tune_config.yaml", BOTTLENECK_CONFIG)
RUN_ARTIFACTS = ("trainer_log.jsonl", "runs", "training_loss.png", SAMPLES_FILE, "reward_curve.png", "update_heatmap.png", "eval_results.json", "r1tune_config.yaml",
                 "skipped_records.jsonl", "adalora_ranks.json", "adalora_ranks.png", BOTTLENECK_CONFIG,
                 BOTTLENECK_WEIGHTS, EXPERT_LOAD_FILE,
                 "adapter_model.safetensors", "adapter_config.json", VALUE_HEAD_FILE, "model.safetensors",
                 "model.safetensors.index.json", "config.json", "generation_config.json")


def check_output_dir(cfg: RunConfig, resuming: bool) -> None:
    out = Path(cfg.output_dir)
    if out.resolve() == Path(cfg.model_name_or_path).expanduser().resolve():
        raise UserError(f"{cfg.source}: output_dir is the base model's own folder; choose another output_dir")
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir '{out}' is a file; choose a folder path")
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"output_dir '{out}' cannot be created: '{ancestor}' is not a writable folder; choose another output_dir")
    finished = out.is_dir() and any((out / m).exists() for m in FINISHED_MARKERS)
    if finished and not cfg.overwrite_output_dir and not resuming:
        raise UserError(f"output_dir '{out}' already holds a trained model; set overwrite_output_dir: true, "
                        "resume_from_checkpoint: auto, or choose another folder")


def clear_previous_run(out: Path) -> None:
    """A fresh (not resumed) run into an existing folder drops the old run's logs and checkpoints."""
    for name in RUN_ARTIFACTS:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    for old in list_checkpoints(out):
        shutil.rmtree(old)
    for shard in out.glob("model-*-of-*.safetensors"):
        shard.unlink()


def forget_after(out: Path, step: int) -> None:
    """A resumed run drops what the interrupted run wrote after `step` (log lines, newer checkpoints)."""
    truncate_log_after(out, step)
    truncate_log_after(out, step, SAMPLES_FILE)
    for newer in list_checkpoints(out):
        if int(newer.name.split("-")[1]) > step:
            shutil.rmtree(newer)


def save_model(model, folder: Path, pissa_start: Path | None = None, state: dict | None = None) -> None:
    """The trained part: bottleneck adapters, a PEFT adapter (PiSSA converted to plain LoRA from the
    start adapter in pissa_start, which is then removed), or the model. `state`: the model's whole state
    dict when its own parameters are shards (FSDP)."""
    extra = {} if state is None else {"state_dict": state}
    if has_bottleneck(model):
        save_bottleneck(model, folder)
        return
    with exact_lora_targets():
        if not hasattr(model, "peft_config"):
            model.save_pretrained(folder, **extra)
            return
        # new token rows live in the adapter; do not copy the whole embedding matrices in
        extra["save_embedding_layers"] = False
        if pissa_start:  # loadable (and mergeable) on the original base weights, by any PEFT user
            extra["path_initial_model_for_weight_conversion"] = str(pissa_start)
        model.save_pretrained(folder, **extra)
    if pissa_start:
        shutil.rmtree(pissa_start, ignore_errors=True)


def save_final(model, tokenizer, cfg: RunConfig, out: Path, pissa_start: Path | None = None,
               state: dict | None = None) -> None:
    """Adapter or full model + tokenizer + resolved config, each file moved into place atomically."""
    tmp = atomic_dir(out / "final")
    try:
        save_model(model, tmp, pissa_start, state)
        tokenizer.save_pretrained(tmp)
        (tmp / "r1tune_config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
        for item in tmp.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
