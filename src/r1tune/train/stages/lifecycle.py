"""What every stage's run does around its training: check → data → model → method → engine → save.

Everything a user can get wrong (config, data, model path, output dir) is checked before the first
byte is written to output_dir. A stage supplies its loss, callbacks and what it measures before
and after; this module does the rest the same way for all of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r1tune.config import RunConfig, refusal_message
from r1tune.data.dataset import PreparedData, write_skipped
from r1tune.data.epochs import augmented_epochs
from r1tune.data.leakage import act_on_leakage
from r1tune.data.prepare import prepare_data
from r1tune.data.templates import apply_template_choice
from r1tune.errors import UserError
from r1tune.fileio import write_text_atomic
from r1tune.models.adalora import is_adalora, rank_allocation, write_rank_report
from r1tune.models.expert_selection import select_experts
from r1tune.models.loading import ensure_tiny_model, load_model, load_tokenizer, resolve_model_path
from r1tune.models.methods import attach_method, describe_trainable
from r1tune.models.quantize import quantization_config
from r1tune.models.run_state import MethodState
from r1tune.models.vocab import add_domain_tokens, read_token_file, resize_and_init
from r1tune.process import is_main
from r1tune.stages import stage_data
from r1tune.train import distributed, zero
from r1tune.train.callbacks import Callback
from r1tune.train.checkpoint import find_checkpoint
from r1tune.train.engine import Engine, TrainResult, examples_per_batch, total_steps
from r1tune.train.fsdp import full_state, is_sharded, plan_of
from r1tune.train.logs import plot_loss
from r1tune.train.memory import peak_memory_gb
from r1tune.train.method_callbacks import AdaLoraRanks, ProgressiveUnfreeze
from r1tune.train.precision import check_precision, pick_device, use_bf16
from r1tune.train.regularize import apply_regularisation
from r1tune.train.run_dir import check_output_dir, clear_previous_run, forget_after, save_final
from r1tune.train.stage_loss import StageLoss
from r1tune.train.watch import watch_callbacks
from r1tune.ui import console, warn


@dataclass
class Run:
    cfg: RunConfig
    out: Path
    resume: Path | None
    model_path: str
    tokenizer: object
    new_ids: list[int]
    data: PreparedData
    epochs: object  # epoch -> augmented examples, or None
    model: object = None
    experts: object = None
    method: MethodState = field(default_factory=MethodState)  # what the method left for saving and counting
    ds: object = None  # DeepSpeed's engine when the run uses one (its ZeRO-3 weights are gathered to save)


def prepare(cfg: RunConfig) -> Run | None:
    """Checks, tokenizer and data; None when do_train is false (the data was checked and reported)."""
    cfg.require("dataset", "output_dir", command="r1tune train")
    out = Path(cfg.output_dir)
    resume = find_checkpoint(cfg.resume_from_checkpoint, out) if cfg.resume_from_checkpoint else None
    if cfg.resume_from_checkpoint and resume is None:
        console.print(f"no checkpoint in {out} yet: starting from step 0")
    check_output_dir(cfg, resuming=resume is not None)
    check_precision(cfg.fp16)
    check_strategy(cfg)
    with distributed.main_first():  # rank 0 builds the tiny model and fills the data cache; the others read them
        ensure_tiny_model(cfg.model_name_or_path, cfg.tiny_arch)
        model_path = resolve_model_path(cfg.model_name_or_path)
        tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
        apply_template_choice(tokenizer, cfg.template, cfg.source, needs_template=stage_data(cfg.stage).needs_template)
        new_ids = add_configured_tokens(tokenizer, cfg)
        data = prepare_data(cfg, tokenizer, say=console.print)
    epochs = augmented_epochs(cfg, tokenizer, data.train_samples, data.train)  # checks the augment_* keys
    for line in data.report.lines():
        console.print(f"data: {line}")
    act_on_leakage(data.report.leakage, cfg.val_leakage, cfg.source, warn)
    if not cfg.do_train:
        console.print("do_train is false: data checked, nothing trained")
        return None
    return Run(cfg, out, resume, model_path, tokenizer, new_ids, data, epochs)


def check_strategy(cfg: RunConfig) -> None:
    """fsdp / deepspeed options checked before any work; ZeRO-3 partitions the output head too, so the loss is
    taken from full logits through the model's forward (the chunked loss reads the head's weight directly)."""
    plan_of(cfg.fsdp, cfg.fsdp_config, cfg.source)
    if zero.stage_of(zero.read_config(cfg.deepspeed, cfg.source)) != 3:
        return
    if cfg.stage == "grpo":
        raise UserError(f"{cfg.source}: {refusal_message('deepspeed', 'stage grpo')} (or use a ZeRO stage 0-2 config)")
    for key, why in (("chunked_loss", "the chunked loss reads the output head's weight, which ZeRO-3 partitions"),
                     ("update_heatmap", "the heatmap compares whole weights between steps")):
        if getattr(cfg, key):
            raise UserError(f"{cfg.source}: '{key}: true' cannot be used with DeepSpeed ZeRO-3 ({why}); remove {key}")
        setattr(cfg, key, False)


def add_configured_tokens(tokenizer, cfg: RunConfig) -> list[int]:
    """Add add_tokens / add_tokens_file to the tokenizer; the new ids (notes printed)."""
    tokens = [t.strip() for t in (cfg.add_tokens or "").split(",") if t.strip()]
    if cfg.add_tokens_file:
        tokens += read_token_file(cfg.add_tokens_file, cfg.source)
    if not tokens:
        return []
    new_ids, notes = add_domain_tokens(tokenizer, tokens)
    for note in notes:
        console.print(f"note: {note}")
    console.print(f"added {len(new_ids)} domain tokens to the vocabulary")
    return new_ids


def build_model(run: Run) -> None:
    """The base model with the configured method attached (run.model, run.experts, run.method)."""
    cfg = run.cfg
    torch.manual_seed(cfg.seed)
    quantization = quantization_config(cfg.quantization_bit, cfg.quantization_type, cfg.double_quantization,
                                       torch.bfloat16 if use_bf16(cfg.bf16, cfg.fp16, pick_device()) else torch.float32)
    model = load_model(run.model_path, torch.float32, cfg.trust_remote_code, cfg.attn_implementation, quantization)
    resize_and_init(model, run.tokenizer, run.new_ids)
    for line in apply_regularisation(model, cfg):
        console.print(f"regularisation: {line}")
    model = attach_method(model, cfg, run.new_ids, total_steps(cfg, len(run.data.train)), run.model_path, run.method)
    run.experts = select_experts(model, cfg, run.data, run.tokenizer.pad_token_id, run.new_ids, run.method)
    console.print(describe_trainable(model, run.method.trained_share))
    run.model = model


def make_engine(run: Run, stage: StageLoss, callbacks: list[Callback]) -> Engine:
    """The engine with the method's callbacks around the stage's: unfreezing first (it decides what
    trains before the others look), AdaLoRA last (its rank update follows the heatmap's measurement)."""
    cfg, model = run.cfg, run.model
    items = ([ProgressiveUnfreeze(cfg.unfreeze_schedule)] if cfg.unfreeze_schedule else []) + list(callbacks)
    items += [AdaLoraRanks()] if is_adalora(model) else []
    engine = Engine(model, cfg, stage, run.data.train, run.data.val, run.out, items, run.epochs,
                    run.experts.no_decay if run.experts else frozenset())
    run.ds = engine.ds
    precision = "bf16 autocast" if engine.bf16 else ("fp16 autocast" if cfg.fp16 else "fp32")
    cutting = f"cut to <= {engine.micro_tokens} tokens" if engine.micro_tokens else "not cut"
    loss_path = getattr(stage, "loss_sum", None)
    loss_kind = "" if loss_path is None else f"{'chunked loss' if loss_path.chunked else 'full-logits loss'}, "
    per_device = examples_per_batch(cfg)
    unit = "prompts" if stage_data(cfg.stage).generates else "examples"
    console.print(f"global batch: {per_device} {unit} per process x {cfg.gradient_accumulation_steps} accumulation x "
                  f"{engine.world} process{'es' if engine.world > 1 else ''} = "
                  f"{per_device * cfg.gradient_accumulation_steps * engine.world} {unit} per optimizer step")
    console.print(f"speed: {precision}, {'length-grouped' if engine.plan.group_by_length else 'shuffled'} batches "
                  f"({cutting}), {loss_kind}gradient checkpointing "
                  f"{'on' if engine.checkpointing else 'off'} ({engine.checkpointing_reason})", style="dim")
    return engine


def standard_callbacks(run: Run, generation=None) -> list[Callback]:
    return watch_callbacks(run.model, run.cfg, generation)


def start(run: Run, engine: Engine) -> None:
    """Resume state (validated before anything is written), then the output folder made ready."""
    if run.resume is not None:
        engine.load_state(run.resume)
    if not is_main():
        return
    run.out.mkdir(parents=True, exist_ok=True)
    if run.resume is None:
        clear_previous_run(run.out)
        if run.data.report.skipped:
            write_skipped(run.out / "skipped_records.jsonl", run.data.report.skipped)
    else:
        forget_after(run.out, engine.state.global_step)
        console.print(f"resumed from {run.resume} at step {engine.state.global_step}")


def finish(run: Run, result: TrainResult, before: dict | None, after: dict) -> None:
    """Final model, method reports, eval_results.json (before/after) and the loss plot."""
    result.model = run.model
    peaks = [round(gb, 3) for gb in distributed.gather_objects(peak_memory_gb(pick_device()))]  # before gathering
    state = full_state(run.model) if is_sharded(run.model) else zero.whole_state(run.ds)  # every rank gathers
    if not is_main():
        return
    cfg, out = run.cfg, run.out
    if len(peaks) > 1:
        console.print(f"peak memory per process: {', '.join(f'{gb:.2f}' for gb in peaks)} GB")
    save_final(run.model, run.tokenizer, cfg, out, run.method.pissa_start, state)
    report_method(run.model, cfg, out, run.experts)
    results = {"before": before, "after": after, "global_step": result.global_step,
               "train_loss": result.last_loss, "train_runtime": result.train_runtime,
               "train_tokens": result.train_tokens, "peak_memory_gb": peaks}
    write_text_atomic(out / "eval_results.json", json.dumps(results, indent=2, ensure_ascii=False))
    if cfg.plot_loss and (png := plot_loss(out)):
        console.print(f"loss curve: {png}")


def report_method(model, cfg: RunConfig, out: Path, experts) -> None:
    """What the method decided during training: AdaLoRA's ranks, experts' load before and after."""
    if is_adalora(model):
        ranks = rank_allocation(model)
        report, png = write_rank_report(model, out)
        console.print(f"AdaLoRA ranks kept: mean {sum(ranks.values()) / max(len(ranks), 1):.1f} of "
                      f"{cfg.adalora_init_r} (min {min(ranks.values(), default=0)}, max "
                      f"{max(ranks.values(), default=0)}) over {len(ranks)} modules; {report}"
                      + (f", {png}" if png else ""))
    if experts:
        experts.finish(model, out)
