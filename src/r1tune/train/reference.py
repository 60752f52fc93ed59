"""The reference model of dpo and kto: the policy as it was before training, in one of three forms.

- AdapterOff: a fresh LoRA-family adapter is the only thing that trains, so the base with the
  adapter switched off *is* the starting policy; no second copy in memory, one extra no-grad
  forward per micro-batch.
- Precomputed: the starting policy scores every training and held-out row once before the first
  step; the log-probabilities travel with the examples (plain records) into the batches.
- FrozenCopy: a frozen copy of the model scores each micro-batch (precompute_ref_log_probs: false
  with full fine-tuning), at the memory of a second model.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch

from r1tune.train.sequence_scores import SequenceScorer
from r1tune.ui import progress


class Reference:
    precomputed = False

    def logps(self, model, scorer: SequenceScorer, batch: dict) -> torch.Tensor:
        """The reference's summed log-probability of every row of the batch (no gradient)."""
        raise NotImplementedError

    def token_logps(self, model, scorer: SequenceScorer, batch: dict, temperature: float = 1.0) -> torch.Tensor:
        """GRPO: the reference's log-probability of every labelled token (sequence_scores.token_logps order)."""
        raise NotImplementedError

    @staticmethod
    def stored(items: list) -> torch.Tensor:
        """Precomputed values of a micro-batch's rows, in row order (each item's first rows, then its second)."""
        return torch.tensor([item.ref_logps[0] for item in items] + [item.ref_logps[1] for item in items])


class AdapterOff(Reference):
    @torch.no_grad()
    def logps(self, model, scorer: SequenceScorer, batch: dict) -> torch.Tensor:
        return self._without_adapter(model, lambda: scorer.logps(batch)[0])

    @torch.no_grad()
    def token_logps(self, model, scorer: SequenceScorer, batch: dict, temperature: float = 1.0) -> torch.Tensor:
        return self._without_adapter(model, lambda: scorer.token_logps(batch, temperature)[0])

    @staticmethod
    def _without_adapter(model, score):
        training = model.training
        model.eval()  # the starting policy without dropout, as the other two forms score it
        try:
            with model.disable_adapter():
                return score()
        finally:
            model.train(training)


class FrozenCopy(Reference):
    def __init__(self, model, chunked: bool | None):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.scorer = SequenceScorer(self.model, chunked)

    @torch.no_grad()
    def logps(self, model, scorer: SequenceScorer, batch: dict) -> torch.Tensor:
        return self._placed(batch).logps(batch)[0]

    @torch.no_grad()
    def token_logps(self, model, scorer: SequenceScorer, batch: dict, temperature: float = 1.0) -> torch.Tensor:
        return self._placed(batch).token_logps(batch, temperature)[0]

    def _placed(self, batch: dict) -> SequenceScorer:
        device = batch["input_ids"].device
        if next(self.model.parameters()).device != device:  # copied before the engine moved the policy
            self.model.to(device)
        return self.scorer


class Precomputed(Reference):
    precomputed = True

    def logps(self, model, scorer: SequenceScorer, batch: dict) -> torch.Tensor:
        return batch["ref_logps"]

    @torch.no_grad()
    def compute(self, model, stage, items: list, batch_size: int, micro_tokens: int, autocast=nullcontext) -> None:
        """Score every item's rows with the model as it is now; stored in item.ref_logps."""
        model.eval()
        device = next(model.parameters()).device
        parts = [part for start in range(0, len(items), batch_size)
                 for part in stage.split(items[start:start + batch_size], micro_tokens or 0)]
        for part in progress(parts, "reference log-probabilities", unit="batch"):
            batch = {k: v.to(device) for k, v in stage.collate_rows(part).items() if v is not None}
            with autocast():
                values = stage.scorer.logps(batch)[0].float().cpu().tolist()
            n = len(part)
            for i, item in enumerate(part):
                item.ref_logps = (values[i], values[n + i])


def choose_reference(model, cfg) -> tuple[Reference, str]:
    """The reference for this run and why (printed). Precomputing is the default wherever the adapter
    trick does not apply: it costs one forward pass over the data, never a second model."""
    if cfg.precompute_ref_log_probs:
        return Precomputed(), "precomputed before training (precompute_ref_log_probs)"
    if fresh_adapter(cfg) and hasattr(model, "disable_adapter"):
        return AdapterOff(), "the base model with the adapter switched off"
    if cfg.precompute_ref_log_probs is False:
        return FrozenCopy(model, cfg.chunked_loss), "a frozen copy of the model (precompute_ref_log_probs: false)"
    return Precomputed(), "precomputed before training (no adapter to switch off)"


def fresh_adapter(cfg) -> bool:
    """A new LoRA-family adapter on the (possibly merged) base: switching it off gives the starting policy."""
    continued = cfg.adapter_name_or_path and not cfg.create_new_adapter
    return cfg.finetuning_type in ("lora", "adalora") and not cfg.pissa_init and not continued


def policy_reference(model, cfg) -> tuple[Reference, str]:
    """GRPO's reference (beta > 0): its completions are new each step, so nothing can be precomputed."""
    if fresh_adapter(cfg) and hasattr(model, "disable_adapter"):
        return AdapterOff(), "the base model with the adapter switched off"
    return FrozenCopy(model, cfg.chunked_loss), "a frozen copy of the starting model"
