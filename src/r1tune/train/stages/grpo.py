"""`stage: grpo` on the shared run lifecycle: reward functions are loaded (and their files checked)
before the model, rollouts happen inside the engine's steps (GRPOLoss.begin_step), and the held-out
prompts are completed greedily and scored before and after training."""

from __future__ import annotations

from pathlib import Path

from r1tune.config import RunConfig
from r1tune.errors import UserError
from r1tune.process import is_main
from r1tune.train.engine import TrainResult
from r1tune.train.grpo_guard import RolloutGuard
from r1tune.train.grpo_stage import GRPOLoss, Settings
from r1tune.train.logs import SAMPLES_FILE, plot_rewards
from r1tune.train.reference import policy_reference
from r1tune.train.reward_model import RewardModelFunc, is_reward_model_dir
from r1tune.train.rewards import load_reward_func, soft_overlong
from r1tune.train.stages import lifecycle
from r1tune.ui import console, print_metric_comparison


def run_grpo(cfg: RunConfig) -> TrainResult | None:
    run = lifecycle.prepare(cfg)
    if run is None:
        return None
    funcs = reward_functions(cfg)
    lifecycle.build_model(run)
    for i, example in enumerate(run.data.train):  # seeds each prompt's sampling
        example.index = i
    reference = None
    if cfg.beta:
        reference, why = policy_reference(run.model, cfg)
        console.print(f"reference model (beta {cfg.beta:g}): {why}")
    stage = GRPOLoss(run.model, run.tokenizer, Settings.of(cfg), funcs, reference, cfg.chunked_loss,
                     run.out / SAMPLES_FILE if is_main() and cfg.log_completions else None)
    guard = [RolloutGuard(stage, cfg.grpo_guard, cfg.grpo_guard_window, cfg.grpo_guard_threshold)] \
        if cfg.grpo_guard != "off" else []
    engine = lifecycle.make_engine(run, stage, lifecycle.standard_callbacks(run) + [stage] + guard)
    console.print(f"grpo: {engine.plan.batch_size} prompts x {cfg.num_generations} completions per batch, "
                  f"{cfg.gradient_accumulation_steps} batch(es) per step, {engine.total} steps, loss_type "
                  f"{cfg.loss_type}, rewards: {', '.join(cfg.reward_funcs)}", style="dim")
    lifecycle.start(run, engine)
    before = engine.evaluate() if run.data.val and run.resume is None else None
    result = engine.fit()
    fresh = result.stopped_early or not result.eval_metrics  # a guard's stop comes after the last evaluation
    after = (engine.evaluate() if run.data.val else {}) if fresh else result.eval_metrics
    lifecycle.finish(run, result, before, after)
    if is_main() and cfg.plot_loss and (png := plot_rewards(run.out)):
        console.print(f"reward curve: {png}")
    if after:
        print_metric_comparison(before, after)
    console.print(f"saved to {run.out} after {result.global_step} steps")
    return result


def reward_functions(cfg: RunConfig) -> list:
    """reward_funcs as callables: built-ins, `length` (sized by the config), reward-model folders, user functions."""
    funcs = []
    for spec in cfg.reward_funcs:
        if spec == "length":
            buffer = cfg.overlong_buffer_len or max(1, cfg.max_completion_length // 4)
            funcs.append(soft_overlong(cfg.max_completion_length, buffer))
        elif is_reward_model_dir(spec):
            funcs.append(RewardModelFunc(spec))
        elif Path(spec).is_dir():
            raise UserError(f"config key 'reward_funcs': '{spec}' is a folder without value_head.safetensors, so not "
                            "the output_dir of a finished 'stage: rm' run")
        else:
            funcs.append(load_reward_func(spec))
    return funcs
