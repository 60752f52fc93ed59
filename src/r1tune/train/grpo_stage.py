"""GRPO's stage loss for the engine: each optimizer step's prompts are completed num_generations times
(rollouts), scored by the reward functions, turned into group-relative advantages, and trained on with
the clipped policy loss (grpo_losses), as TRL's GRPOTrainer does.

Rollouts run through r1tune's batched KV-cache decoder (models.decode.complete), each completion
sampled with its own seed drawn from (seed, rollout round, prompt index, generation), so a run and a
resumed run sample the same tokens. With num_iterations > 1 one round of rollouts serves that many
optimizer steps; the rollouts (and the generating policy's log-probabilities) are kept in checkpoints,
so a resume in the middle of a round trains on the same completions.
"""

from __future__ import annotations

import json
import math
import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from r1tune.data.encode import IGNORE, Example
from r1tune.models.attention import mask_format
from r1tune.models.decode import complete, eos_ids_of
from r1tune.models.lora_fold import folded_lora
from r1tune.models.sampling import Params
from r1tune.train import batching, distributed
from r1tune.train.callbacks import Callback
from r1tune.train.grpo_losses import group_advantages, token_terms, token_weights
from r1tune.train.rewards import call_reward, combine, func_name
from r1tune.train.sequence_scores import SequenceScorer
from r1tune.train.stage_loss import StageLoss, Stats


@dataclass
class Rollout:
    """One sampled completion, ready to train on."""
    input_ids: list[int]  # prompt + completion
    prompt_len: int
    advantage: float
    weight: float  # weight of each of its tokens' losses (loss_type)
    unit: float  # its share of the optimizer step's units
    trained: bool  # False: left out of the loss (cut at max_completion_length under mask_truncated_completions)
    old_logps: list[float] | None = None  # the generating policy's (num_iterations > 1)
    ref_logps: list[float] | None = None  # the reference's (beta > 0)

    @property
    def completion(self) -> list[int]:
        return self.input_ids[self.prompt_len:]

    def row(self) -> Example:
        labels = [IGNORE] * self.prompt_len + (self.completion if self.trained else [IGNORE] * len(self.completion))
        return Example(self.input_ids, labels)


@dataclass
class Settings:
    """The grpo keys the loss needs (RunConfig's GrpoArgs, resolved)."""
    num_generations: int
    max_completion_length: int
    temperature: float
    top_p: float
    beta: float
    loss_type: str
    epsilon: float
    epsilon_high: float | None
    num_iterations: int
    scale_rewards: str
    mask_truncated_completions: bool
    reward_weights: list[float] | None
    generation_batch_rows: int
    num_completions_to_print: int
    seed: int

    @classmethod
    def of(cls, cfg) -> "Settings":
        return cls(cfg.num_generations, cfg.max_completion_length,
                   1.0 if cfg.temperature is None else cfg.temperature, cfg.top_p, cfg.beta, cfg.loss_type,
                   cfg.epsilon, cfg.epsilon_high, cfg.num_iterations, cfg.scale_rewards,
                   cfg.mask_truncated_completions, cfg.reward_weights, cfg.generation_batch_rows,
                   cfg.num_completions_to_print, cfg.seed)


def rollout_precision(engine):
    """Autocast for decoding on accelerators; on CPU decoding stays fp32: one row-token at a time, autocast
    re-casts the frozen weights every step (tiny Qwen2, 16 rows: 9.6 vs 6.8 ms per token)."""
    return nullcontext() if engine.device.type == "cpu" else engine.autocast()


def sample_seed(seed: int, round_: int, prompt: int, generation: int) -> int:
    """The sampling seed of one completion; string seeding is stable across processes and versions."""
    return random.Random(f"grpo/{seed}/{round_}/{prompt}/{generation}").getrandbits(63)


class GRPOLoss(StageLoss, Callback):
    key = "grpo"  # its checkpoint state: the current round of rollouts

    def __init__(self, model, tokenizer, settings: Settings, reward_funcs: list, reference=None,
                 chunked: bool | None = None, samples_path: Path | None = None):
        self.s, self.tokenizer, self.funcs, self.reference = settings, tokenizer, reward_funcs, reference
        self.samples_path = samples_path  # completions.jsonl (None: not written here)
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = eos_ids_of(model, tokenizer)
        self.attn = mask_format(getattr(model.config, "_attn_implementation", None))
        self.scorer = SequenceScorer(model, chunked)
        self.repeats = settings.num_iterations
        self.rollouts: list[list[Rollout]] | None = None  # the current round's batches
        self.round = -1
        self.samples: list[dict] = []  # a few completions of the latest round, for completions.jsonl
        self.signals: dict[str, float] = {}  # the latest round's guard signals (grpo_guard)

    # --- the engine's stage interface -------------------------------------------------
    def lengths(self, examples: list) -> list[int]:
        return [len(e.input_ids) + self.s.max_completion_length for e in examples]

    def split(self, examples: list, budget: int) -> list[list]:
        return batching.cut_longest_first(examples, budget, size=lambda r: len(r.input_ids))

    def begin_step(self, engine, step: int, batches: list[list]) -> tuple[list[list], Stats]:
        """The step's batches of rollouts: a new round every num_iterations steps, else the current one."""
        if step % self.repeats == 0 or self.rollouts is None:
            stats = self.generate(engine, step // self.repeats, batches)
            return self.rollouts, stats
        return self.rollouts, {}

    def collate(self, rollouts: list[Rollout]) -> dict:
        batch = batching.collate([r.row() for r in rollouts], self.pad_id, self.attn)
        trained = [r for r in rollouts if r.trained]
        per_token = lambda values: torch.tensor([v for r in trained for v in values(r)], dtype=torch.float32)
        batch["advantages"] = per_token(lambda r: [r.advantage] * len(r.completion))
        batch["token_weights"] = per_token(lambda r: [r.weight] * len(r.completion))
        if self.repeats > 1:
            batch["old_logps"] = per_token(lambda r: r.old_logps)
        if self.s.beta:
            batch["ref_logps"] = per_token(lambda r: r.ref_logps)
        batch["n_units"] = torch.tensor(sum(r.unit for r in rollouts), dtype=torch.float64)
        return batch

    def filler(self, prompt) -> dict:
        """A zero-advantage rollout of the prompt and one pad token (see StageLoss.filler)."""
        rollout = Rollout(prompt.input_ids + [self.pad_id], len(prompt.input_ids), 0.0, 0.0, 0.0, True)
        rollout.old_logps = rollout.ref_logps = [0.0]
        return self.collate([rollout])

    def units(self, batch: dict) -> float:
        return float(batch["n_units"])

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, Stats]:
        logps, entropy, aux = self.scorer.token_logps_and_aux(batch, self.s.temperature)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()  # one step per round: ratio 1
        per_token, info = token_terms(logps, old, batch["advantages"], self.s.epsilon, self.s.epsilon_high,
                                      self.s.beta, batch.get("ref_logps"))
        n = logps.numel()
        low, high = int(info["low"].sum()), int(info["high"].sum())
        stats = {"entropy": (float(entropy.sum()), n), "clip_ratio/low_mean": (low, n),
                 "clip_ratio/high_mean": (high, n), "clip_ratio/region_mean": (low + high, n)}
        if "kl" in info:
            stats["kl"] = (float(info["kl"].detach().sum()), n)
        loss = (per_token * batch["token_weights"]).sum()
        if aux is not None:  # the router's balance term, weighted by the micro-batch's share of the step
            loss = loss + aux * self.units(batch)
            stats["aux_loss"] = (float(aux.detach()), 1)
        return loss, stats

    @torch.no_grad()
    def evaluate(self, model, examples: list, batch_size: int, micro_tokens: int, autocast=nullcontext) -> dict:
        """Greedy completions of the held-out prompts, scored by the reward functions."""
        model.eval()
        with autocast(), folded_lora(model):
            done = complete(model, [e.input_ids for e in examples],
                            [Params(self.s.max_completion_length) for _ in examples], self.eos_ids, self.pad_id,
                            self.s.generation_batch_rows)
        per_func, _ = self.score(examples, [c.ids for c in done], step=None)
        rewards = torch.tensor(combine(per_func, self.s.reward_weights))
        metrics = {"reward": _nanmean(rewards), "reward_std": _nanstd(rewards)}
        for func, values in zip(self.funcs, per_func):
            metrics[f"rewards/{func_name(func)}/mean"] = _nanmean(torch.tensor(values))
        metrics.update(_length_stats(done))
        return metrics

    @staticmethod
    def describe(metrics: dict) -> str:
        return "eval (greedy) " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())

    # --- rollouts ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, engine, round_: int, batches: list[list]) -> Stats:
        """A round of rollouts for the step's batches of prompts: sample, score, advantages (self.rollouts)."""
        model, g = engine.model, self.s.num_generations
        prompts = [p for batch in batches for p in batch]
        if not prompts:  # this rank's share of a short last batch (several processes)
            self.rollouts, self.round = [], round_
            self._share_signals(torch.zeros(0), torch.zeros(0, dtype=torch.bool), [])
            return {}
        model.eval()
        params = [Params(self.s.max_completion_length, self.s.temperature, self.s.top_p,
                         sample_seed(self.s.seed, round_, p.index, j)) for p in prompts for j in range(g)]
        with rollout_precision(engine), folded_lora(model):
            done = complete(model, [p.input_ids for p in prompts for _ in range(g)], params, self.eos_ids,
                            self.pad_id, self.s.generation_batch_rows)
        expanded = [p for p in prompts for _ in range(g)]
        per_func, texts = self.score(expanded, [c.ids for c in done], step=engine.state.global_step,
                                     total=engine.total)
        rewards = torch.tensor(combine(per_func, self.s.reward_weights), dtype=torch.float32)
        advantages, zero_std = group_advantages(rewards, g, self.s.scale_rewards)
        self.rollouts = self._batches(batches, expanded, done, advantages.tolist())
        self._reference_scores(engine)
        self.round = round_
        self._keep_samples(engine.state.global_step + 1, expanded, texts, per_func, rewards, advantages)
        return self._stats(rewards, per_func, zero_std, done)

    def score(self, prompts: list, completion_ids: list[list[int]], step: int | None, total: int | None = None
              ) -> tuple[list[list[float]], list[str]]:
        """Every reward function's values (NaN: abstained), called with TRL's keywords, and the completions' texts."""
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids]
        conversational = [not isinstance(p.prompt, str) for p in prompts]
        completions = [[{"role": "assistant", "content": t}] if conv else t for t, conv in zip(texts, conversational)]
        columns = {name: [p.columns.get(name) for p in prompts] for name in dict.fromkeys(
            k for p in prompts for k in p.columns)}
        inputs = dict(prompts=[p.prompt for p in prompts], completions=completions, completion_ids=completion_ids,
                      prompt_texts=[p.text for p in prompts], trainer_state=SimpleNamespace(global_step=step or 0,
                                                                                           max_steps=total),
                      **columns)
        return [call_reward(func, len(texts), **inputs) for func in self.funcs], texts

    def _batches(self, batches: list[list], expanded: list, done: list, advantages: list[float]) -> list[list[Rollout]]:
        """Rollouts grouped as the step's batches were, each with its loss weight and units."""
        out, at = [], 0
        for batch in batches:
            n = len(batch) * self.s.num_generations
            items = []
            for prompt, completion, advantage in zip(expanded[at:at + n], done[at:at + n], advantages[at:at + n]):
                trained = completion.finished or not self.s.mask_truncated_completions
                items.append(Rollout(prompt.input_ids + completion.ids, len(prompt.input_ids), advantage, 0.0, 0.0,
                                     trained))
            lengths = [len(r.completion) if r.trained else 0 for r in items]
            weights, units = token_weights(self.s.loss_type, lengths, sum(lengths), self.s.max_completion_length)
            for item, weight, unit in zip(items, weights, units):
                item.weight, item.unit = weight, unit
            out.append(items)
            at += n
        return out

    def _reference_scores(self, engine) -> None:
        """The generating policy's (num_iterations > 1) and the reference's (beta > 0) token log-probabilities."""
        if self.repeats == 1 and not self.s.beta:
            return
        model = engine.model
        items = [r for batch in self.rollouts for r in batch if r.trained]
        for part in self.split(items, engine.micro_tokens):
            batch = {k: v.to(engine.device) for k, v in batching.collate([r.row() for r in part], self.pad_id,
                                                                          self.attn).items()}
            with engine.autocast():
                old = self.scorer.token_logps(batch, self.s.temperature)[0] if self.repeats > 1 else None
                ref = (self.reference.token_logps(model, self.scorer, batch, self.s.temperature)
                       if self.s.beta else None)
            at = 0
            for r in part:
                n = len(r.completion)
                r.old_logps = old[at:at + n].float().cpu().tolist() if old is not None else None
                r.ref_logps = ref[at:at + n].float().cpu().tolist() if ref is not None else None
                at += n

    def _stats(self, rewards: torch.Tensor, per_func: list[list[float]], zero_std: torch.Tensor, done: list) -> Stats:
        """TRL's rollout metrics for this round, each counted once per round."""
        g = self.s.num_generations
        group_std = torch.stack([_nanstd(group, tensor=True) for group in rewards.view(-1, g)])
        values = {"reward": _nanmean(rewards), "reward_std": float(group_std.mean()),
                  "frac_reward_zero_std": float(zero_std.view(-1, g)[:, 0].float().mean())}
        for func, scores in zip(self.funcs, per_func):
            scores = torch.tensor(scores)
            values[f"rewards/{func_name(func)}/mean"] = _nanmean(scores)
            values[f"rewards/{func_name(func)}/std"] = _nanstd(scores)
        values.update(_length_stats(done))
        self._share_signals(rewards, zero_std, done)
        return {name: (value, 1) for name, value in values.items() if not math.isnan(value)}

    def _share_signals(self, rewards: torch.Tensor, zero_std: torch.Tensor, done: list) -> None:
        """The guard's shares over the whole round: every rank's rollouts (r1tune.train.distributed)."""
        g = self.s.num_generations
        counts = distributed.sum_floats([float(zero_std.view(-1, g)[:, 0].sum()), len(rewards) / g,
                                         sum(not c.finished for c in done), len(done),
                                         float(((rewards == 0) | rewards.isnan()).sum())])
        zero_groups, groups, clipped, completions, zero = counts
        self.signals = {"frac_reward_zero_std": zero_groups / max(groups, 1),
                        "completions/clipped_ratio": clipped / max(completions, 1),
                        "frac_reward_zero": zero / max(completions, 1)}

    def _keep_samples(self, step: int, prompts: list, texts: list[str], per_func: list, rewards, advantages) -> None:
        self.samples = [{"step": step, "prompt": p.text, "completion": t,
                         **{func_name(f): _plain(v[i]) for f, v in zip(self.funcs, per_func)},
                         "reward": _plain(float(rewards[i])), "advantage": round(float(advantages[i]), 4)}
                        for i, (p, t) in enumerate(zip(prompts, texts)) if i < self.s.num_completions_to_print]

    # --- callback: completions.jsonl, and the round kept in checkpoints ------------------
    def on_log(self, engine, record: dict) -> None:
        if self.samples and engine.writes and self.samples_path is not None:
            with self.samples_path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in self.samples)
            self.samples = []

    def state_dict(self) -> dict | None:
        if self.rollouts is None or self.repeats == 1:  # a new round starts at every step
            return None
        return {"round": self.round, "rollouts": [[asdict(r) for r in batch] for batch in self.rollouts]}

    def load_state_dict(self, state: dict) -> None:
        self.round = state["round"]
        self.rollouts = [[Rollout(**r) for r in batch] for batch in state["rollouts"]]


def _plain(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def _nanmean(values: torch.Tensor) -> float:
    return float(values.nanmean()) if (~values.isnan()).any() else math.nan


def _nanstd(values: torch.Tensor, tensor: bool = False):
    """Sample standard deviation ignoring NaN (0 below two values)."""
    kept = values[~values.isnan()]
    std = kept.std() if kept.numel() > 1 else torch.tensor(0.0)
    return std if tensor else float(std)


def _length_stats(done: list) -> dict[str, float]:
    """TRL's completion-length metrics; clipped = cut at max_completion_length (no EOS)."""
    lengths = torch.tensor([len(c.ids) for c in done], dtype=torch.float32)
    finished = torch.tensor([c.finished for c in done])
    out = {"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
           "completions/max_length": float(lengths.max()), "completions/clipped_ratio": float((~finished).float().mean())}
    if finished.any():
        out["completions/mean_terminated_length"] = float(lengths[finished].mean())
    return out

