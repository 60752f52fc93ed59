"""Losses of the preference (dpo), KTO and reward-model stages, on per-sequence log-probabilities.

Pure torch: no model, no trainer. Inputs are per-sequence log-probabilities *summed* over the
target tokens, shape (B,), plus the target-token counts where a loss needs their average.
Every loss comes back per example (or per pair), unreduced: the caller sums and normalises over
the examples of an optimizer step, as r1tune does for its token losses.

The semantics follow LLaMA-Factory (keys pref_loss, pref_beta, pref_ftx, simpo_gamma,
dpo_label_smoothing, kto_chosen_weight, kto_rejected_weight) and its TRL 0.2x losses:

* sigmoid / hinge use summed log-probs; ipo, orpo and simpo use length-AVERAGED log-probs,
  for the policy and (ipo) the reference alike.
* pref_ftx adds ftx * (-chosen_logps / chosen_len), the chosen answer's mean token NLL, to every
  kind (orpo already carries one such term of weight 1, so ftx adds on top of it).
* rewards (detached, for logging): beta * (policy - ref) for reference-based kinds, beta * policy
  for orpo / simpo, each on the same (summed or averaged) log-probs the loss used.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

PREF_LOSSES = ("sigmoid", "hinge", "ipo", "orpo", "simpo")
REFERENCE_FREE = frozenset({"orpo", "simpo"})
AVERAGED = frozenset({"ipo", "orpo", "simpo"})


class PreferenceOutput(NamedTuple):
    losses: torch.Tensor  # (B,) per pair, not reduced
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached


def average_logps(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Summed log-probs divided by the target-token count (an empty target counts as 1, not 0/0)."""
    return logps / lengths.to(logps.dtype).clamp(min=1)


def sft_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean token NLL of the chosen answer: pref_ftx's term and ORPO's NLL term."""
    return -average_logps(chosen_logps, chosen_lengths)


def dpo_sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO; with label_smoothing e > 0 the conservative cDPO mix (1-e)·DPO(y_w>y_l) + e·DPO(y_l>y_w).

    `logits` is (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)


def dpo_hinge_loss(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC's hinge on the DPO logits: relu(1 - beta·logits)."""
    return torch.relu(1 - beta * logits)


def ipo_loss(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Eq. 17): (logits - 1/(2·beta))², beta playing the paper's tau; logits from averaged log-probs."""
    return (logits - 1 / (2 * beta)) ** 2


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, switching form at -ln 2 so neither branch loses precision."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float) -> torch.Tensor:
    """ORPO: chosen mean-token NLL + beta · -logsigmoid(log odds ratio), on averaged log-probs."""
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    return -chosen_avg - beta * F.logsigmoid(log_odds)


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO: -logsigmoid(beta·(chosen - rejected) - gamma), on averaged log-probs, no reference."""
    return -F.logsigmoid(beta * (chosen_avg - rejected_avg) - gamma)


def _check_kind(kind: str, ref_given: bool, lengths_given: bool, ftx: float, label_smoothing: float) -> None:
    if kind not in PREF_LOSSES:
        raise ValueError(f"unknown pref_loss {kind!r}; expected one of {', '.join(PREF_LOSSES)}")
    if kind not in REFERENCE_FREE and not ref_given:
        raise ValueError(f"pref_loss {kind!r} needs the reference model's log-probs")
    if (kind in AVERAGED or ftx) and not lengths_given:
        raise ValueError(f"pref_loss {kind!r} (or pref_ftx) needs the target-token counts to average log-probs")
    if label_smoothing and kind != "sigmoid":  # LLaMA-Factory rejects this combination too
        raise ValueError("dpo_label_smoothing only applies to pref_loss 'sigmoid'")


def _pair_losses(kind, pc, pr, rc, rr, beta, simpo_gamma, label_smoothing) -> torch.Tensor:
    if kind == "orpo":
        return orpo_loss(pc, pr, beta)
    if kind == "simpo":
        return simpo_loss(pc, pr, beta, simpo_gamma)
    logits = (pc - pr) - (rc - rr)
    if kind == "sigmoid":
        return dpo_sigmoid_loss(logits, beta, label_smoothing)
    if kind == "hinge":
        return dpo_hinge_loss(logits, beta)
    return ipo_loss(logits, beta)


def preference_loss(kind: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor | None = None, ref_rejected: torch.Tensor | None = None,
                    chosen_len: torch.Tensor | None = None, rejected_len: torch.Tensor | None = None,
                    beta: float = 0.1, ftx: float = 0.0, simpo_gamma: float = 0.5,
                    label_smoothing: float = 0.0) -> PreferenceOutput:
    """Per-pair loss of pref_loss `kind` with pref_ftx's SFT term, and the detached rewards.

    All log-probs are summed over the target tokens; for ipo / orpo / simpo (AVERAGED) this
    divides them (policy and reference) by chosen_len / rejected_len first. sigmoid / hinge work
    on the sums. ref_* are required unless `kind` is reference-free (orpo, simpo), where they are
    ignored. The ftx term is ftx · (-policy_chosen / chosen_len) whatever the kind."""
    _check_kind(kind, ref_chosen is not None and ref_rejected is not None,
                chosen_len is not None and rejected_len is not None, ftx, label_smoothing)
    pc, pr, rc, rr = policy_chosen, policy_rejected, ref_chosen, ref_rejected
    if kind in AVERAGED:
        pc, pr = average_logps(pc, chosen_len), average_logps(pr, rejected_len)
        if kind not in REFERENCE_FREE:
            rc, rr = average_logps(rc, chosen_len), average_logps(rr, rejected_len)
    losses = _pair_losses(kind, pc, pr, rc, rr, beta, simpo_gamma, label_smoothing)
    if ftx:
        losses = losses + ftx * sft_loss(policy_chosen, chosen_len)
    if kind in REFERENCE_FREE:
        chosen_rewards, rejected_rewards = beta * pc.detach(), beta * pr.detach()
    else:
        chosen_rewards, rejected_rewards = beta * (pc - rc).detach(), beta * (pr - rr).detach()
    return PreferenceOutput(losses, chosen_rewards, rejected_rewards)


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: mean policy-ref log-ratio over the mismatched (prompt, answer)
    pairs, detached (no gradient flows through z0) and clamped at 0 (a KL is never negative)."""
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float = 0.1, chosen_weight: float = 1.0,
             rejected_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO loss and detached reward beta·(policy - ref), in the input order.

    Summed log-probs, r = policy - ref, kl from kto_kl. A desirable example (bool mask, (B,))
    costs kto_chosen_weight · (1 - sigmoid(beta·(r - kl))), an undesirable one
    kto_rejected_weight · (1 - sigmoid(beta·(kl - r)))."""
    logratios = policy_logps - ref_logps
    chosen = chosen_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    rejected = rejected_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(desirable.bool(), chosen, rejected), beta * logratios.detach()


def pairwise_rm_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss of a reward model, per pair: -logsigmoid(chosen - rejected), in fp32."""
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float())


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Sums over the batch of the rewards/* metrics TRL logs, plus the pair count.

    Sums, not means, so a caller can add them over a whole step or eval set and divide once:
    rewards/accuracies counts the pairs whose chosen reward is strictly above the rejected one."""
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    sums = torch.stack([chosen.sum(), rejected.sum(), (chosen - rejected).sum(), (chosen > rejected).sum()])
    values = sums.tolist()  # one device sync for all four
    names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    return {**dict(zip(names, values)), "count": float(chosen.numel())}


def kto_reward_metrics(rewards: torch.Tensor, desirable: torch.Tensor) -> dict[str, float]:
    """KTO's rewards as sums and counts per side (its chosen and rejected examples are unpaired,
    so rewards/margins is mean chosen - mean rejected, formed by the caller after dividing)."""
    rewards, desirable = rewards.detach().float(), desirable.bool()
    sums = torch.stack([rewards[desirable].sum(), rewards[~desirable].sum(), desirable.sum().float()])
    chosen_sum, rejected_sum, n_chosen = sums.tolist()
    return {"rewards/chosen": chosen_sum, "rewards/rejected": rejected_sum,
            "count/chosen": n_chosen, "count/rejected": float(desirable.numel()) - n_chosen}
