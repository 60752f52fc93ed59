"""What a stage gives the engine: how its examples become micro-batches, what one optimizer step's
loss is averaged over, the loss itself, and its held-out metrics (and, for a stage that generates what
it trains on, how a step's examples become that: begin_step).

The engine sums `loss(model, batch)` over a step's micro-batches and divides by the step's total
`units` (target tokens for causal-LM training, pairs for preference training), so the update is
that of the mean over the whole step however the examples fall into micro-batches. `loss` also
returns statistics as (sum, count) pairs; the engine logs sum / count over each logging window.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from r1tune.data.packing import example_lengths
from r1tune.models.attention import mask_format
from r1tune.train import batching
from r1tune.train.held_out import LossSum, held_out_sum, perplexity

Stats = dict[str, tuple[float, int]]


def add_stats(total: Stats, new: Stats) -> None:
    """Add (sum, count) statistics into a running total."""
    for name, (value, count) in new.items():
        old = total.get(name, (0.0, 0))
        total[name] = (old[0] + float(value), old[1] + count)


class StageLoss:
    def filler(self, example) -> dict:
        """A micro-batch built from one of the step's examples, which a process trains with weight 0 to run as
        many forwards and backwards as the busiest process (sharded weights make them collective)."""
        return self.collate([example])

    def begin_step(self, engine, step: int, batches: list[list]) -> tuple[list[list], Stats]:
        """The step's batches as the loss takes them, and statistics to log with the step. Most stages
        train on their examples as they are; GRPO completes its prompts here (rollouts)."""
        return batches, {}

    def split(self, examples: list, budget: int) -> list[list]:
        """A batch cut into micro-batches of at most `budget` padded tokens (0: whole)."""
        return batching.split_by_tokens(examples, budget)

    def lengths(self, examples: list) -> list[int]:
        """Tokens of the longest row each example puts in a micro-batch (batch order and memory)."""
        return example_lengths(examples)

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def units(self, batch: dict) -> int:
        raise NotImplementedError

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, Stats]:
        raise NotImplementedError

    def evaluate(self, model, examples: list, batch_size: int, micro_tokens: int, autocast=nullcontext) -> dict:
        raise NotImplementedError

    @staticmethod
    def describe(metrics: dict) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


class CausalLMLoss(StageLoss):
    """sft and pt: next-token cross-entropy summed over the labelled tokens (label smoothing while
    training), chunked from the hidden states where the head allows."""

    def __init__(self, model, pad_id: int, chunked: bool | None, label_smoothing: float = 0.0):
        self.pad_id, self.smoothing = pad_id, label_smoothing
        self.attn = mask_format(getattr(model.config, "_attn_implementation", None))
        self.loss_sum = LossSum(model, chunked)

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        return batching.collate(examples, self.pad_id, self.attn)

    def units(self, batch: dict) -> int:
        return batching.count_targets(batch)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, Stats]:
        return self.loss_sum(batch, self.smoothing if model.training else 0.0), {}

    def evaluate(self, model, examples: list, batch_size: int, micro_tokens: int, autocast=nullcontext) -> dict:
        """Mean token loss over the validation set (train.held_out, as r1tune eval measures it)."""
        total, count = held_out_sum(model, examples, self.pad_id, batch_size, self.loss_sum, micro_tokens, autocast)
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": perplexity(loss)}

    @staticmethod
    def describe(metrics: dict) -> str:
        return f"eval loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}"
