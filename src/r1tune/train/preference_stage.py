"""The stage losses of preference and reward training (dpo, kto, rm) for the engine.

A preference pair goes through one forward: a micro-batch's rows are its chosen answers, then its
rejected ones, cut to the same token budget as SFT's micro-batches (two rows per pair). The step's
loss is the mean over its pairs (KTO: its examples). The reference model is the policy before
training: the base with the adapter switched off (LoRA), or log-probabilities computed once before
training and carried in the batch (see reference.py).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from r1tune.models.attention import mask_format
from r1tune.models.prompt_methods import is_prompt_learning
from r1tune.train import batching
from r1tune.train.pref_losses import (REFERENCE_FREE, kto_kl, kto_loss, kto_reward_metrics, pairwise_rm_loss,
                                      preference_loss, reward_metrics, sft_loss)
from r1tune.train.sequence_scores import SequenceScorer, last_token_states
from r1tune.train.stage_loss import StageLoss, Stats, add_stats

def row_length(item) -> int:
    """The longer of an item's two rows (PairExample, KTOExample)."""
    return max(len(row.input_ids) for row in item.rows)


class _RowsStage(StageLoss):
    """Stages whose items are two rows each (PairExample, KTOExample): a micro-batch's rows are every
    item's first row, then every item's second, in one forward; the step's loss is the mean over items."""

    packs = True  # rows side by side in shared rows (batching.collate_packed); rm reads last tokens instead

    def __init__(self, model, pad_id: int, chunked: bool | None, reference=None):
        self.pad_id, self.reference = pad_id, reference
        self.attn = mask_format(getattr(model.config, "_attn_implementation", None))
        self.scorer = SequenceScorer(model, chunked)
        # prompt learning: virtual tokens lead each row, not each part; flash attention finds the parts'
        # boundaries from restarting positions only in a batch of one row (transformers 5.25)
        self.packs = self.packs and not is_prompt_learning(model) and not self.attn.startswith("flash")

    def split(self, examples: list, budget: int) -> list[list]:
        return batching.cut_longest_first(examples, budget // 2, size=row_length)

    def lengths(self, examples: list) -> list[int]:
        return [row_length(item) for item in examples]

    def collate_rows(self, items: list) -> dict:
        rows = [i.rows[0] for i in items] + [i.rows[1] for i in items]
        collate = batching.collate_packed if self.packs else batching.collate
        return {**collate(rows, self.pad_id, self.attn), "n_items": torch.tensor(len(items))}

    def collate(self, items: list) -> dict:
        batch = self.collate_rows(items)
        if self.reference is not None and self.reference.precomputed:
            batch["ref_logps"] = self.reference.stored(items)
        return batch

    def units(self, batch: dict) -> int:
        return int(batch["n_items"])

    @torch.no_grad()
    def evaluate(self, model, examples: list, batch_size: int, micro_tokens: int, autocast=nullcontext) -> dict:
        model.eval()
        device = next(model.parameters()).device
        total, units, stats = 0.0, 0, {}
        for start in range(0, len(examples), batch_size):
            for part in self.split(examples[start:start + batch_size], micro_tokens or 0):
                batch = {k: v.to(device) for k, v in self.collate(part).items() if v is not None}
                with autocast():
                    loss, part_stats = self.loss(model, batch)
                total += loss.item()
                units += self.units(batch)
                add_stats(stats, part_stats)
        return {"loss": total / max(units, 1), **finish_stats(stats)}

    @staticmethod
    def describe(metrics: dict) -> str:
        return "eval " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def finish_stats(stats: Stats) -> dict:
    """(sum, count) pairs as means; KTO's margins formed from its unpaired means."""
    means = {name: value / count for name, (value, count) in stats.items() if count}
    if "rewards/margins" not in means and {"rewards/chosen", "rewards/rejected"} <= set(means):
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means


def _pair_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> Stats:
    sums = reward_metrics(chosen_rewards, rejected_rewards)
    count = int(sums.pop("count"))
    return {name: (value, count) for name, value in sums.items()}


class DPOLoss(_RowsStage):
    """pref_loss sigmoid / hinge / ipo / orpo / simpo with pref_ftx (r1tune.train.pref_losses)."""

    def __init__(self, model, pad_id: int, chunked: bool | None, reference, kind: str, beta: float, ftx: float,
                 simpo_gamma: float, label_smoothing: float):
        super().__init__(model, pad_id, chunked, None if kind in REFERENCE_FREE else reference)
        self.kind, self.beta, self.ftx, self.gamma, self.smoothing = kind, beta, ftx, simpo_gamma, label_smoothing

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, Stats]:
        n = int(batch["n_items"])
        logps, counts = self.scorer.logps(batch)
        ref = self.reference.logps(model, self.scorer, batch) if self.reference is not None else None
        out = preference_loss(self.kind, logps[:n], logps[n:], *((ref[:n], ref[n:]) if ref is not None else (None, None)),
                              counts[:n], counts[n:], self.beta, self.ftx, self.gamma, self.smoothing)
        stats = _pair_stats(out.chosen_rewards, out.rejected_rewards)
        # what the policy itself prefers, by mean log-probability per token: about chance before
        # training (rewards/accuracies is 0 then: every reward is 0 while policy = reference)
        chosen_avg, rejected_avg = logps[:n] / counts[:n].clamp(min=1), logps[n:] / counts[n:].clamp(min=1)
        stats["choice_accuracy"] = (float((chosen_avg > rejected_avg).sum()), n)
        stats["logps/chosen"] = (float(logps[:n].detach().sum()), n)
        stats["logps/rejected"] = (float(logps[n:].detach().sum()), n)
        return out.losses.sum(), stats


class RewardModelLoss(_RowsStage):
    """Pairwise reward model: the value head scores each row's last token; -logsigmoid(chosen - rejected)."""

    packs = False

    def __init__(self, model, pad_id: int, chunked: bool | None, head: nn.Module):
        super().__init__(model, pad_id, chunked)
        self.head = head  # a submodule of the model, so the engine's optimizer and checkpoints hold it

    def scores(self, batch: dict) -> torch.Tensor:
        """The value head on each row's last real token (fp32)."""
        states = self.scorer.last_hidden(batch)
        return self.head(last_token_states(states, batch["attention_mask"]).float()).squeeze(-1)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, Stats]:
        n = int(batch["n_items"])
        scores = self.scores(batch)
        stats = _pair_stats(scores[:n], scores[n:])
        stats["accuracy"] = stats["rewards/accuracies"]  # LLaMA-Factory's name for it
        return pairwise_rm_loss(scores[:n], scores[n:]).sum(), stats


class KTOLoss(_RowsStage):
    """KTO on single answers: rows are the micro-batch's examples, then their mismatched (prompt,
    other answer) rows whose log-ratio estimates the reference point z0 (kto_kl)."""

    def __init__(self, model, pad_id: int, chunked: bool | None, reference, beta: float, chosen_weight: float,
                 rejected_weight: float, ftx: float = 0.0):
        super().__init__(model, pad_id, chunked, reference)
        self.beta, self.weights, self.ftx = beta, (chosen_weight, rejected_weight), ftx

    def collate(self, items: list) -> dict:
        batch = super().collate(items)
        batch["desirable"] = torch.tensor([item.label == "true" for item in items])
        return batch

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, Stats]:
        n = int(batch["n_items"])
        logps, counts = self.scorer.logps(batch)
        ref = self.reference.logps(model, self.scorer, batch)
        kl = kto_kl(logps[n:].detach(), ref[n:])
        losses, rewards = kto_loss(logps[:n], ref[:n], batch["desirable"], kl, self.beta, *self.weights)
        if self.ftx:  # pref_ftx: the SFT term on desirable answers only (as LLaMA-Factory's KTO)
            losses = losses + self.ftx * sft_loss(logps[:n], counts[:n]) * batch["desirable"]
        sums = kto_reward_metrics(rewards, batch["desirable"])
        stats = {"rewards/chosen": (sums["rewards/chosen"], int(sums["count/chosen"])),
                 "rewards/rejected": (sums["rewards/rejected"], int(sums["count/rejected"])),
                 "kl": (float(kl) * n, n)}
        return losses.sum(), stats
