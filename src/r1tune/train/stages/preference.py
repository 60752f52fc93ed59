"""Preference and reward training on the shared run lifecycle: `stage: dpo` (pref_loss sigmoid,
hinge, ipo, orpo, simpo), `stage: kto` and `stage: rm` (a pairwise reward model). Held-out pairs
are measured before and after with TRL's metric names (rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies; KTO also kl)."""

from __future__ import annotations

import time

from r1tune.config import RunConfig
from r1tune.data.encode import with_mismatched
from r1tune.models.value_head import ValueHead, save_value_head
from r1tune.process import is_main
from r1tune.train.engine import TrainResult
from r1tune.train.preference_stage import DPOLoss, KTOLoss, RewardModelLoss
from r1tune.train.reference import Precomputed, choose_reference
from r1tune.train.stages import lifecycle
from r1tune.train.style_shift import style_shift
from r1tune.ui import console, print_metric_comparison


def run_preference(cfg: RunConfig) -> TrainResult | None:
    run = lifecycle.prepare(cfg)
    if run is None:
        return None
    lifecycle.build_model(run)
    if cfg.stage == "kto":  # each example gets its mismatched row for the KL estimate
        run.data.train = with_mismatched(run.data.train, cfg.cutoff_len)
        run.data.val = with_mismatched(run.data.val, cfg.cutoff_len) if run.data.val else []
    stage, reference = make_stage(run)
    engine = lifecycle.make_engine(run, stage, lifecycle.standard_callbacks(run))
    started = time.perf_counter()
    if isinstance(reference, Precomputed):
        reference.compute(run.model, stage, list(run.data.train) + list(run.data.val),
                          cfg.per_device_eval_batch_size, engine.micro_tokens, engine.autocast)
    reference_seconds = time.perf_counter() - started
    lifecycle.start(run, engine)
    before = _measure(run, engine) if run.resume is None else None
    result = engine.fit()
    result.train_runtime += reference_seconds  # the reference's pass is part of training's cost
    after = _measure(run, engine, result.eval_metrics)
    if cfg.stage == "rm":
        _save_head(run)
    lifecycle.finish(run, result, _plain(before), _plain(after))
    print_metric_comparison(_plain(before), _plain(after))
    if after.get("sample"):
        console.print(f"sample after training: {after['sample'][0]!r} → {after['sample'][1]!r}")
    console.print(f"saved to {run.out} after {result.global_step} steps")
    return result


def _measure(run, engine, metrics: dict | None = None) -> dict:
    """Held-out metrics (the engine's last evaluation when given), and for dpo with
    eval_generate_samples how often generated answers are closer to the chosen style."""
    cfg = run.cfg
    scores = dict(metrics or (engine.evaluate() if run.data.val else {}))
    pairs = [s for s in run.data.val_samples if s.kind == "preference"][: cfg.eval_generate_samples]
    if cfg.stage == "dpo" and pairs:
        scores.update(style_shift(run.model, run.tokenizer, pairs, cfg.max_new_tokens, cfg.empty_think,
                                  cfg.per_device_eval_batch_size))
    return scores


def _plain(scores: dict | None) -> dict | None:
    return None if scores is None else {k: v for k, v in scores.items() if k != "sample"}


def make_stage(run):
    """The stage's loss and (dpo / kto) its reference model, with the choice printed."""
    cfg, model, pad = run.cfg, run.model, run.tokenizer.pad_token_id
    if cfg.stage == "rm":
        model.add_module("v_head", ValueHead(model.config.hidden_size))
        return RewardModelLoss(model, pad, cfg.chunked_loss, model.v_head), None
    reference = None
    if cfg.stage == "kto" or cfg.pref_loss not in ("orpo", "simpo"):
        reference, why = choose_reference(model, cfg)
        console.print(f"reference model: {why}")
    if cfg.stage == "kto":
        return KTOLoss(model, pad, cfg.chunked_loss, reference, cfg.pref_beta, cfg.kto_chosen_weight,
                       cfg.kto_rejected_weight, cfg.pref_ftx), reference
    return DPOLoss(model, pad, cfg.chunked_loss, reference, cfg.pref_loss, cfg.pref_beta, cfg.pref_ftx,
                   cfg.simpo_gamma, cfg.dpo_label_smoothing), reference


def _save_head(run) -> None:
    """value_head.safetensors beside the final adapter/model; the head leaves the model before its save."""
    head = run.model.v_head
    del run.model.v_head
    if is_main():
        run.out.mkdir(parents=True, exist_ok=True)
        console.print(f"value head: {save_value_head(head, run.out)}")
