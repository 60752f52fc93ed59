"""Supervised fine-tuning (and pretraining): the causal-LM loss on the shared run lifecycle, with
held-out loss, perplexity and (optionally) exact match of generated answers before and after."""

from __future__ import annotations

from r1tune.config import RunConfig
from r1tune.models.generate import GenerationScore, exact_match, generation_metrics
from r1tune.train.engine import Engine, TrainResult
from r1tune.train.held_out import perplexity
from r1tune.train.stage_loss import CausalLMLoss
from r1tune.train.stages import lifecycle
from r1tune.ui import console, print_comparison


def run_sft(cfg: RunConfig) -> TrainResult | None:
    run = lifecycle.prepare(cfg)
    if run is None:
        return None
    lifecycle.build_model(run)
    stage = CausalLMLoss(run.model, run.tokenizer.pad_token_id, cfg.chunked_loss, cfg.label_smoothing_factor)
    callbacks = lifecycle.standard_callbacks(run, training_generation(run.model, run.tokenizer, run.data, cfg))
    engine = lifecycle.make_engine(run, stage, callbacks)
    lifecycle.start(run, engine)
    conversations = run.data.val_conversations
    before = _measure(engine, run.tokenizer, conversations, cfg) if run.resume is None else None
    result = engine.fit()
    after = _measure(engine, run.tokenizer, conversations, cfg, eval_loss=result.eval_loss)
    lifecycle.finish(run, result, _plain(before), _plain(after))
    print_comparison(before, after)
    console.print(f"saved to {run.out} after {result.global_step} steps")
    return result


def training_generation(model, tokenizer, data, cfg: RunConfig):
    """The generation metrics the engine logs every generate_metrics_steps (None when not asked for)."""
    if not cfg.generate_metrics_steps:
        return None
    conversations = data.val_conversations[: cfg.eval_generate_samples or 16]

    def measure() -> dict:
        return generation_metrics(model, tokenizer, conversations, cfg.max_new_tokens, cfg.empty_think,
                                  cfg.per_device_eval_batch_size)
    return measure


def _measure(engine: Engine, tokenizer, conversations, cfg, eval_loss: float | None = None) -> dict:
    """Eval loss, perplexity and (optionally) exact-match accuracy of generated answers."""
    scores: dict = {}
    if engine.val_set:
        loss = eval_loss if eval_loss is not None else engine.evaluate()["loss"]
        scores.update(eval_loss=loss, perplexity=perplexity(loss))
    if cfg.eval_generate_samples and conversations:
        score: GenerationScore = exact_match(engine.model, tokenizer, conversations[: cfg.eval_generate_samples],
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
