"""The held-out loss: mean next-token loss over the labelled tokens of held-out examples, teacher-forced,
and its perplexity. One implementation for training's evaluations, `r1tune eval` and the quantized
copies `r1tune export` scores, so their figures are the same measurement (the quickstart's 1.06).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from r1tune.errors import UserError
from r1tune.models.attention import mask_format
from r1tune.models.prompt_methods import is_prompt_learning
from r1tune.train import batching
from r1tune.train.chunked_loss import chunked_loss_sum, plain_head
from r1tune.train.losses import causal_lm_loss_sum

# A mean loss above 50 nats per token is divergence, not a model to compare; capping perplexity at
# exp(50) keeps logs, plots and JSON finite.
MAX_LOSS_FOR_PERPLEXITY = 50.0


def perplexity(mean_loss: float) -> float:
    """exp(mean loss per token), capped at exp(50)."""
    return math.exp(min(mean_loss, MAX_LOSS_FOR_PERPLEXITY))


def choose_loss_path(model, chunked: bool | None):
    """(decoder, head) for the chunked loss, or None for the plain one; `chunked` None means when possible."""
    prompt = is_prompt_learning(model)  # virtual tokens enter through the PEFT wrapper's own forward
    split = plain_head(model) if chunked is not False and not prompt else None
    if chunked and prompt:
        raise UserError("config key 'chunked_loss' is true, but prompt / prefix / P-tuning models compute their "
                        "logits through PEFT's wrapper; remove the key (or set it false)")
    if chunked and split is None:
        raise UserError(f"config key 'chunked_loss' is true, but {type(model).__name__}'s logits are not a plain "
                        "output projection of the last hidden state; remove the key (or set it false)")
    return split


class LossSum:
    """batch -> summed token loss: chunked from the hidden states when the head allows (a fraction of
    the logits' memory), else from full logits. chunked=True insists on the chunked path."""

    def __init__(self, model, chunked: bool | None = None):
        self.model, self.split = model, choose_loss_path(model, chunked)

    @property
    def chunked(self) -> bool:
        return self.split is not None

    def __call__(self, batch: dict, smoothing: float = 0.0) -> torch.Tensor:
        inputs = {**batching.model_inputs(batch), "use_cache": False}
        if self.split is not None:
            decoder, head = self.split
            return chunked_loss_sum(decoder(**inputs).last_hidden_state, head.weight, batch["labels"],
                                    smoothing=smoothing)
        return causal_lm_loss_sum(self.model(**inputs).logits, batch["labels"], smoothing)


@torch.no_grad()
def held_out_sum(model, examples, pad_id: int, batch_size: int, loss_sum=None, micro_tokens: int | None = None,
                 autocast=nullcontext, batches=None) -> tuple[float, int]:
    """(summed token loss, labelled tokens) over `examples` in eval mode: batches of batch_size, each
    cut to micro_tokens padded tokens (None: uncut). `batches` wraps the batch list (a progress bar)."""
    model.eval()
    loss_sum = loss_sum or LossSum(model)
    attn = mask_format(getattr(model.config, "_attn_implementation", None))
    device = next(model.parameters()).device
    parts = [part for i in range(0, len(examples), batch_size)
             for part in batching.split_by_tokens(examples[i:i + batch_size], micro_tokens or 0)]
    total, count = 0.0, 0
    for part in batches(parts) if batches else parts:
        batch = {k: v.to(device) for k, v in batching.collate(part, pad_id, attn).items() if v is not None}
        with autocast():
            total += loss_sum(batch).item()
        count += batching.count_targets(batch)
    return total, count
