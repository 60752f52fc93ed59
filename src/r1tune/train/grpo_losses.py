"""GRPO's pure pieces (issue 18), no model: group-relative advantages and the clipped policy loss with
TRL's loss types and names.

Rewards are (prompts x num_generations) in generation order, NaN where every reward function abstained;
such a completion gets advantage 0 (it teaches nothing) instead of spreading NaN through its group.
Per-token tensors are (completions, completion length) with a 0/1 mask of real completion tokens.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # as TRL: a group whose rewards barely differ is not blown up


def _row_nanstd(x: torch.Tensor) -> torch.Tensor:
    """Per row of a 2-D tensor: sample standard deviation (Bessel-corrected) ignoring NaN; 0 below two values."""
    valid = ~x.isnan()
    count = valid.sum(1)
    squares = torch.where(valid, (x - x.nanmean(1, keepdim=True)) ** 2, torch.zeros_like(x))
    return torch.where(count > 1, (squares.sum(1) / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(count, dtype=x.dtype))


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, per completion whether its group's rewards have zero spread).

    reward - its group's mean, divided by the group's std (`group`), the whole batch's std (`batch`),
    or not at all (`none`, Dr. GRPO)."""
    if scale not in SCALES:
        raise ValueError(f"scale_rewards must be one of {SCALES}, got {scale!r}")
    groups = rewards.view(-1, num_generations)
    mean = groups.nanmean(dim=1).repeat_interleave(num_generations)
    group_std = _row_nanstd(groups).repeat_interleave(num_generations)
    std = _row_nanstd(rewards.view(1, -1)).expand_as(rewards) if scale == "batch" else group_std
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + STD_EPS)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return advantages, torch.isclose(group_std, torch.zeros_like(group_std))


def token_terms(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float = 0.2,
                epsilon_high: float | None = None, beta: float = 0.0, ref_logps: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per token: the clipped surrogate -min(r A, clip(r, 1-eps, 1+eps_high) A) (+ beta x k3 KL to the
    reference), and per token whether it was clipped low / high and (beta != 0) its KL. Any shape;
    `advantages` broadcasts (one per completion as (completions, 1), or one per token)."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps)
    clipped = ratio.clamp(1 - epsilon, 1 + eps_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    # TRL's clip ratios: clipped where that changes the loss (below 1-eps with A < 0, above 1+eps_high with A > 0)
    info = {"low": (ratio < 1 - epsilon) & (advantages < 0), "high": (ratio > 1 + eps_high) & (advantages > 0)}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs the reference's log-probabilities")
        diff = ref_logps - logps
        info["kl"] = torch.exp(diff) - diff - 1  # k3: unbiased, always >= 0
        per_token = per_token + beta * info["kl"]
    return per_token, info


def token_weights(loss_type: str, lengths: list[int], batch_tokens: int, max_completion_length: int
                  ) -> tuple[list[float], list[float]]:
    """Per completion of one batch: (the weight of each of its tokens' losses, its share of the optimizer
    step's units), so that sum(weight x token loss) / sum(units) over a step is `loss_type`'s reduction
    however the step's completions fall into micro-batches. `lengths`: trained tokens per completion."""
    if loss_type == "dapo":  # sum over tokens / the step's tokens
        return [1.0] * len(lengths), [float(n) for n in lengths]
    if loss_type == "bnpo":  # mean over each batch's tokens, averaged over the step's batches
        total = max(batch_tokens, 1)
        return [1.0 / total] * len(lengths), [n / total for n in lengths]
    if loss_type == "grpo":  # each completion's token mean, averaged over completions
        return [1.0 / max(n, 1) for n in lengths], [1.0] * len(lengths)
    if loss_type == "dr_grpo":  # sum over tokens / (completions x max_completion_length)
        return [1.0 / max_completion_length] * len(lengths), [1.0] * len(lengths)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                loss_type: str = "dapo", epsilon: float = 0.2, epsilon_high: float | None = None,
                beta: float = 0.0, ref_logps: torch.Tensor | None = None, max_completion_length: int | None = None,
                num_tokens: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """token_terms on (completions, length) tensors with a 0/1 mask of real tokens, reduced as `loss_type`:

    grpo: mean over completions of each completion's mean over its tokens;
    bnpo: mean over the micro-batch's tokens;
    dr_grpo: sum over tokens / (completions x max_completion_length);
    dapo: sum over tokens / `num_tokens` (the tokens of the whole optimizer step; default this batch's).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    per_token, info = token_terms(logps, old_logps, adv, epsilon, epsilon_high, beta, ref_logps)
    tokens = mask.sum().clamp(min=1)
    low, high = float((info["low"] * mask).sum() / tokens), float((info["high"] * mask).sum() / tokens)
    stats = {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low + high}
    if "kl" in info:
        stats["kl"] = float((info["kl"] * mask).sum() / tokens)
    return _reduce(per_token * mask, mask, loss_type, max_completion_length, num_tokens), stats


def _reduce(masked: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int | None,
            num_tokens: float | None) -> torch.Tensor:
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length")
        return masked.sum() / (masked.size(0) * max_completion_length)
    return masked.sum() / max(float(num_tokens if num_tokens is not None else mask.sum()), 1.0)
