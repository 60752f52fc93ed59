"""Supervised fine-tuning, top to bottom: check → data → model → method → train → save.

Everything a user can get wrong (config, data, model path, output dir) is checked
before the first byte is written to output_dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from r1tune.config import RunConfig
from r1tune.data.dataset import write_skipped
from r1tune.data.epochs import augmented_epochs
from r1tune.data.leakage import act_on_leakage
from r1tune.data.prepare import prepare_data
from r1tune.data.templates import apply_template_choice
from r1tune.evaluation.generate import GenerationScore, exact_match, generation_metrics
from r1tune.fileio import write_text_atomic
from r1tune.models.adalora import is_adalora, rank_allocation, write_rank_report
from r1tune.models.loading import ensure_tiny_model, load_model, load_tokenizer, resolve_model_path
from r1tune.models.expert_selection import select_experts
from r1tune.models.methods import attach_method, describe_trainable
from r1tune.models.quantize import quantization_config
from r1tune.models.vocab import add_domain_tokens, read_token_file, resize_and_init
from r1tune.stages import stage_data
from r1tune.train.checkpoint import find_checkpoint
from r1tune.train.held_out import perplexity
from r1tune.train.logs import plot_loss
from r1tune.train.regularize import apply_regularisation
from r1tune.train.run_dir import check_output_dir, clear_previous_run, forget_after, save_final
from r1tune.train.trainer import TrainResult, Trainer, check_precision, pick_device, total_steps, use_bf16
from r1tune.ui import console, print_comparison, warn

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


def run_sft(cfg: RunConfig) -> TrainResult | None:
    cfg.require("dataset", "output_dir", command="r1tune train")
    out = Path(cfg.output_dir)
    resume = find_checkpoint(cfg.resume_from_checkpoint, out) if cfg.resume_from_checkpoint else None
    if cfg.resume_from_checkpoint and resume is None:
        console.print(f"no checkpoint in {out} yet: starting from step 0")
    check_output_dir(cfg, resuming=resume is not None)
    check_precision(cfg.fp16)
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
    torch.manual_seed(cfg.seed)
    quantization = quantization_config(cfg.quantization_bit, cfg.quantization_type, cfg.double_quantization,
                                       torch.bfloat16 if use_bf16(cfg.bf16, cfg.fp16, pick_device()) else torch.float32)
    model = load_model(model_path, torch.float32, cfg.trust_remote_code, cfg.attn_implementation, quantization)
    resize_and_init(model, tokenizer, new_ids)
    for line in apply_regularisation(model, cfg):
        console.print(f"regularisation: {line}")
    model = attach_method(model, cfg, new_ids, total_steps(cfg, len(data.train)), model_path)
    experts = select_experts(model, cfg, data, tokenizer.pad_token_id, new_ids)
    console.print(describe_trainable(model))
    trainer = Trainer(model, cfg, data.train, data.val, tokenizer.pad_token_id, out, epochs,
                      experts.no_decay if experts else frozenset(), training_generation(model, tokenizer, data, cfg))
    precision = "bf16 autocast" if trainer.bf16 else ("fp16 autocast" if cfg.fp16 else "fp32")
    cutting = f"cut to <= {trainer.micro_tokens} tokens" if trainer.micro_tokens else "not cut"
    console.print(f"speed: {precision}, {'length-grouped' if trainer.plan.group_by_length else 'shuffled'} batches "
                  f"({cutting}), {'chunked loss' if trainer.loss_sum.chunked else 'full-logits loss'}, gradient checkpointing "
                  f"{'on' if trainer.checkpointing else 'off'} ({trainer.checkpointing_reason})", style="dim")
    if resume is not None:
        trainer.load_state(resume)  # validated before anything is written
    out.mkdir(parents=True, exist_ok=True)
    if resume is None:
        clear_previous_run(out)
        if data.report.skipped:
            write_skipped(out / "skipped_records.jsonl", data.report.skipped)
    else:
        forget_after(out, trainer.state.global_step)
        console.print(f"resumed from {resume} at step {trainer.state.global_step}")
    before = _measure(trainer, tokenizer, data.val_conversations, cfg) if resume is None else None
    result = trainer.fit()
    after = _measure(trainer, tokenizer, data.val_conversations, cfg, eval_loss=result.eval_loss)
    save_final(model, tokenizer, cfg, out)
    report_method(model, cfg, out, experts)
    results = {"before": _plain(before), "after": _plain(after), "global_step": result.global_step,
               "train_loss": result.last_loss, "train_runtime": result.train_runtime,
               "train_tokens": result.train_tokens}
    write_text_atomic(out / "eval_results.json", json.dumps(results, indent=2, ensure_ascii=False))
    if cfg.plot_loss and (png := plot_loss(out)):
        console.print(f"loss curve: {png}")
    print_comparison(before, after)
    console.print(f"saved to {out} after {result.global_step} steps")
    result.model = model
    return result


def training_generation(model, tokenizer, data, cfg: RunConfig):
    """The generation metrics the trainer logs every generate_metrics_steps (None when not asked for)."""
    if not cfg.generate_metrics_steps:
        return None
    conversations = data.val_conversations[: cfg.eval_generate_samples or 16]

    def measure() -> dict:
        return generation_metrics(model, tokenizer, conversations, cfg.max_new_tokens, cfg.empty_think,
                                  cfg.per_device_eval_batch_size)
    return measure


def _measure(trainer: Trainer, tokenizer, conversations, cfg, eval_loss: float | None = None) -> dict:
    """Eval loss, perplexity and (optionally) exact-match accuracy of generated answers."""
    scores: dict = {}
    if trainer.val_set:
        loss = eval_loss if eval_loss is not None else trainer.evaluate()
        scores.update(eval_loss=loss, perplexity=perplexity(loss))
    if cfg.eval_generate_samples and conversations:
        score: GenerationScore = exact_match(trainer.model, tokenizer, conversations[: cfg.eval_generate_samples],
                                             cfg.max_new_tokens, cfg.empty_think)
        scores["exact_match"] = score.accuracy
        scores["sample"] = example_samples(score.samples)
    return scores


def example_samples(samples: list[tuple]) -> list[tuple]:
    """The first right and the first wrong generation (when there is one of each), in held-out order."""
    first = {}
    for sample in samples:
        first.setdefault(sample[3], sample)
    return sorted(first.values(), key=samples.index)


def _plain(scores: dict | None) -> dict | None:
    return None if scores is None else {k: v for k, v in scores.items() if k != "sample"}


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
