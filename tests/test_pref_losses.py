"""Preference, KTO and reward-model losses: each against its formula written out with `math`,
and, where TRL is importable, against TRL's own trainer code on the same log-probabilities."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from r1tune.train.pref_losses import (AVERAGED, PREF_LOSSES, REFERENCE_FREE, kto_kl, kto_loss, kto_reward_metrics,
                                      pairwise_rm_loss, preference_loss, reward_metrics)

# Three pairs: summed target log-probs of policy and reference, and target-token counts.
PC, PR = [-12.0, -30.0, -8.0], [-15.0, -25.0, -20.0]
RC, RR = [-13.0, -29.0, -9.5], [-14.0, -26.0, -18.0]
LC, LR = [4, 10, 2], [5, 8, 6]


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def run(kind, ref=True, **hp):
    refs = (t(RC), t(RR)) if ref else (None, None)
    return preference_loss(kind, t(PC), t(PR), *refs, t(LC), t(LR), **hp)


def close(tensor, expected, tol=1e-10):
    assert tensor.tolist() == pytest.approx(expected, abs=tol)


# ---- each kind against its formula ----

def test_sigmoid_uses_summed_logps():
    beta = 0.1
    out = run("sigmoid", beta=beta)
    logits = [(pc - pr) - (rc - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]
    close(out.losses, [-logsig(beta * x) for x in logits])
    close(out.chosen_rewards, [beta * (pc - rc) for pc, rc in zip(PC, RC)])
    close(out.rejected_rewards, [beta * (pr - rr) for pr, rr in zip(PR, RR)])


def test_sigmoid_label_smoothing_is_cdpo():
    beta, eps = 0.3, 0.2
    out = run("sigmoid", beta=beta, label_smoothing=eps)
    logits = [(pc - pr) - (rc - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]
    close(out.losses, [-(1 - eps) * logsig(beta * x) - eps * logsig(-beta * x) for x in logits])


def test_hinge_on_both_sides_of_the_margin():
    beta = 0.5  # logits 2, -2, 3.5: pairs 0 and 2 past the margin (loss 0), pair 1 not
    out = run("hinge", beta=beta)
    close(out.losses, [0.0, 2.0, 0.0])


def test_ipo_averages_policy_and_reference():
    beta = 0.1
    out = run("ipo", beta=beta)
    expected, rewards = [], []
    for pc, pr, rc, rr, lc, lr in zip(PC, PR, RC, RR, LC, LR):
        x = (pc / lc - pr / lr) - (rc / lc - rr / lr)
        expected.append((x - 1 / (2 * beta)) ** 2)
        rewards.append(beta * (pc / lc - rc / lc))
    close(out.losses, expected)
    close(out.chosen_rewards, rewards)  # LLaMA-Factory logs ipo's rewards on the averages


def test_orpo_nll_plus_odds_ratio_on_averages():
    beta = 0.1
    out = run("orpo", ref=False, beta=beta)
    expected = []
    for pc, pr, lc, lr in zip(PC, PR, LC, LR):
        p_w, p_l = math.exp(pc / lc), math.exp(pr / lr)
        log_odds = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
        expected.append(-pc / lc - beta * logsig(log_odds))
    close(out.losses, expected)
    close(out.chosen_rewards, [beta * pc / lc for pc, lc in zip(PC, LC)])
    close(out.rejected_rewards, [beta * pr / lr for pr, lr in zip(PR, LR)])


def test_simpo_on_averages_with_margin():
    beta, gamma = 2.0, 0.5
    out = run("simpo", ref=False, beta=beta, simpo_gamma=gamma)
    close(out.losses, [-logsig(beta * (pc / lc - pr / lr) - gamma) for pc, pr, lc, lr in zip(PC, PR, LC, LR)])
    close(out.chosen_rewards, [beta * pc / lc for pc, lc in zip(PC, LC)])


def test_reference_free_kinds_ignore_reference():
    for kind in REFERENCE_FREE:
        with_ref, without = run(kind, ref=True), run(kind, ref=False)
        assert torch.equal(with_ref.losses, without.losses)


@pytest.mark.parametrize("kind", PREF_LOSSES)
def test_ftx_adds_chosen_mean_token_nll(kind):
    ftx = 0.3
    ref = kind not in REFERENCE_FREE
    diff = run(kind, ref=ref, ftx=ftx).losses - run(kind, ref=ref).losses
    close(diff, [ftx * -pc / lc for pc, lc in zip(PC, LC)])


def test_sets():
    assert REFERENCE_FREE == {"orpo", "simpo"} and AVERAGED == {"ipo", "orpo", "simpo"}


def test_gradient_reaches_policy_and_rewards_are_detached():
    pc, pr = t(PC).requires_grad_(), t(PR).requires_grad_()
    out = preference_loss("sigmoid", pc, pr, t(RC), t(RR), beta=0.1)
    out.losses.sum().backward()
    assert pc.grad is not None and (pc.grad < 0).all() and (pr.grad > 0).all()
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_empty_target_does_not_divide_by_zero():
    out = preference_loss("simpo", t([0.0]), t([-3.0]), chosen_len=t([0]), rejected_len=t([3]), beta=1.0,
                          simpo_gamma=0.0)
    close(out.losses, [-logsig(1.0)])


@pytest.mark.parametrize("call, message", [
    (lambda: run("dpo"), "unknown pref_loss"),
    (lambda: run("sigmoid", ref=False), "reference"),
    (lambda: preference_loss("ipo", t(PC), t(PR), t(RC), t(RR)), "token counts"),
    (lambda: preference_loss("sigmoid", t(PC), t(PR), t(RC), t(RR), ftx=0.1), "token counts"),
    (lambda: run("hinge", label_smoothing=0.1), "label_smoothing"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- KTO, reward model, metrics ----

def test_kto_kl_is_clamped_detached_mean():
    policy = t([-3.0, -5.0, -4.0]).requires_grad_()
    kl = kto_kl(policy, t([-4.0, -4.0, -4.5]))
    assert kl.item() == pytest.approx((1.0 - 1.0 + 0.5) / 3) and not kl.requires_grad
    assert kto_kl(t([-6.0, -5.0]), t([-4.0, -4.0])).item() == 0.0  # mean -1.5 clamps to 0


def test_kto_loss_per_example_in_input_order():
    beta, kl, w_d, w_u = 0.5, 0.2, 1.5, 0.7
    pol, ref, tags = [-10.0, -12.0, -7.0, -20.0], [-11.0, -11.0, -9.0, -18.0], [True, False, True, False]
    losses, rewards = kto_loss(t(pol), t(ref), torch.tensor(tags), t(kl), beta, w_d, w_u)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [w_d * (1 - sig(beta * (p - r - kl))) if d else w_u * (1 - sig(beta * (kl - (p - r))))
                for p, r, d in zip(pol, ref, tags)]
    close(losses, expected)
    close(rewards, [beta * (p - r) for p, r in zip(pol, ref)])


def test_pairwise_rm_loss():
    close(pairwise_rm_loss(t([1.0, -2.0, 0.5]), t([0.0, 1.0, 0.5])), [-logsig(1.0), -logsig(-3.0), math.log(2)],
          tol=1e-6)


def test_reward_metrics_are_sums_with_count():
    m = reward_metrics(t([0.5, -0.2, 0.1]), t([0.1, 0.3, 0.1]))
    assert m == pytest.approx({"rewards/chosen": 0.4, "rewards/rejected": 0.5, "rewards/margins": -0.1,
                               "rewards/accuracies": 1.0, "count": 3.0})


def test_kto_reward_metrics_split_by_tag():
    m = kto_reward_metrics(t([0.5, -0.2, 0.1, 0.4]), torch.tensor([True, False, True, False]))
    assert m == pytest.approx({"rewards/chosen": 0.6, "rewards/rejected": 0.2, "count/chosen": 2.0,
                               "count/rejected": 2.0})


# ---- against TRL's own code (trl>=1.x: its trainers read per-token log-probs from a fused head) ----

class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


class _TableLM:
    """Stands in for a model with TRL's fused LM head: each token id has a fixed log-prob."""

    def __init__(self, table):
        self.table = table

    def __call__(self, input_ids, labels, **_):
        logps = torch.where(labels[:, 1:] != -100, self.table[input_ids[:, 1:]], 0.0)
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _sequences(logps, lengths):
    """Token rows (prompt token 0, then `n` fresh completion tokens, then padding) whose completion
    log-probs, under the _TableLM returned, sum to `logps`."""
    width = 1 + max(lengths)
    ids = torch.zeros(len(logps), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    table = [0.0]
    for row, (logp, n) in enumerate(zip(logps, lengths)):
        ids[row, 1:n + 1] = torch.arange(len(table), len(table) + n)
        mask[row, 1:n + 1] = 1
        table += [logp / n] * n
    return ids, mask, _TableLM(t(table))


def _stub(**attrs):
    return SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                           **attrs)


def _trl_dpo(loss_type, pc, pr, rc, rr, lc, lr, beta, label_smoothing=0.0):
    from trl import DPOTrainer

    ids, mask, model = _sequences(pc + pr, lc + lr)
    stub = _stub(ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                 loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "ref_chosen_logps": t(rc), "ref_rejected_logps": t(rr)}
    loss = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return loss.item(), {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo"])
def test_dpo_kinds_match_trl(kind):
    pytest.importorskip("trl")
    beta = 0.5 if kind == "hinge" else 0.1
    trl_loss, trl_metrics = _trl_dpo(kind, PC, PR, RC, RR, LC, LR, beta)
    ours = run(kind, beta=beta)
    assert ours.losses.mean().item() == pytest.approx(trl_loss, abs=1e-9)
    if kind != "ipo":  # TRL 1.x logs ipo's rewards on the sums, LLaMA-Factory (and r1tune) on the averages
        m = reward_metrics(ours.chosen_rewards, ours.rejected_rewards)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert m[key] / m["count"] == pytest.approx(trl_metrics[key], abs=1e-6)  # TRL averages accuracy in fp32


def test_label_smoothing_matches_trl_cdpo():
    """TRL 1.x dropped sigmoid's label smoothing; its "aot" loss is cDPO on batch-sorted log-ratios,
    which for a single pair is exactly LLaMA-Factory's (TRL 0.2x's) smoothed sigmoid."""
    pytest.importorskip("trl")
    beta, eps = 0.3, 0.2
    ours = run("sigmoid", beta=beta, label_smoothing=eps).losses
    for i in range(len(PC)):
        trl_loss, _ = _trl_dpo("aot", [PC[i]], [PR[i]], [RC[i]], [RR[i]], [LC[i]], [LR[i]], beta, eps)
        assert ours[i].item() == pytest.approx(trl_loss, abs=1e-9)


def test_simpo_matches_trl_cpo():
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    beta, gamma = 2.0, 0.5
    stub = _stub(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=0.0)
    avg_c, avg_r = t(PC) / t(LC), t(PR) / t(LR)
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(stub, avg_c, avg_r)
    ours = run("simpo", ref=False, beta=beta, simpo_gamma=gamma)
    close(ours.losses, trl_losses.tolist())
    close(ours.chosen_rewards, trl_chosen.tolist())
    close(ours.rejected_rewards, trl_rejected.tolist())


def test_orpo_matches_trl_odds_ratio_loss():
    """TRL's ORPO loss is nll - mean(odds_ratio_loss); per pair: -chosen_avg - odds_ratio_loss."""
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    beta = 0.1
    avg_c, avg_r = t(PC) / t(LC), t(PR) / t(LR)
    trl_ratio_losses, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(_stub(beta=beta), avg_c, avg_r)
    ours = run("orpo", ref=False, beta=beta)
    close(ours.losses, (-avg_c - trl_ratio_losses.double()).tolist(), tol=1e-5)  # TRL computes in fp32
    close(ours.chosen_rewards, trl_chosen.tolist(), tol=1e-5)
    close(ours.rejected_rewards, trl_rejected.tolist(), tol=1e-5)


@pytest.mark.parametrize("kl_shift", [0.0, 3.0])  # 3.0 drives the mean KL estimate negative: clamped to 0
def test_kto_matches_trl(kl_shift):
    pytest.importorskip("trl")
    from trl import KTOTrainer

    beta, w_d, w_u = 0.5, 1.5, 0.7
    pol, ref, tags = [-10.0, -12.0, -7.0, -20.0], [-11.0, -11.0, -9.0, -18.0], [True, False, True, False]
    kl_pol, kl_ref, lengths = [-9.0, -14.0, -8.0, -21.0], [-9.5, -13.5, -9.0, -20.5 + kl_shift * 4], [3, 4, 2, 5]
    kl_lengths = lengths[-1:] + lengths[:-1]
    ids, mask, model = _sequences(pol + kl_pol, lengths + kl_lengths)
    n = len(pol)
    stub = _stub(precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=w_d,
                 undesirable_weight=w_u)
    stub._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(stub, m, b)
    batch = {"input_ids": ids[:n], "attention_mask": torch.ones_like(ids[:n]), "completion_mask": mask[:n],
             "KL_input_ids": ids[n:], "KL_attention_mask": torch.ones_like(ids[n:]), "KL_completion_mask": mask[n:],
             "label": torch.tensor(tags), "ref_logps": t(ref), "ref_KL_logps": t(kl_ref)}
    trl_loss = KTOTrainer._compute_loss(stub, model, batch, return_outputs=False).item()
    trl_metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}

    kl = kto_kl(t(kl_pol), t(kl_ref))
    assert kl.item() == pytest.approx(trl_metrics["kl"], abs=1e-9)
    assert (kl.item() == 0.0) == (kl_shift > 0)
    losses, rewards = kto_loss(t(pol), t(ref), torch.tensor(tags), kl, beta, w_d, w_u)
    assert losses.mean().item() == pytest.approx(trl_loss, abs=1e-9)
    m = kto_reward_metrics(rewards, torch.tensor(tags))
    assert m["rewards/chosen"] / m["count/chosen"] == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-9)
    assert m["rewards/rejected"] / m["count/rejected"] == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-9)


def test_rm_loss_matches_trl_reward_trainer():
    pytest.importorskip("trl")
    from trl import RewardTrainer

    chosen, rejected = t([1.0, -2.0, 0.5, 3.0], torch.float32), t([0.0, 1.0, 0.25, -1.0], torch.float32)
    scores = torch.cat([chosen, rejected]).unsqueeze(-1)
    stub = _stub(args=SimpleNamespace(center_rewards_coefficient=None))
    model = lambda **_: SimpleNamespace(logits=scores)  # noqa: E731
    trl_loss = RewardTrainer.compute_loss(stub, model, {"attention_mask": torch.ones(8, 3)}).item()
    assert pairwise_rm_loss(chosen, rejected).mean().item() == pytest.approx(trl_loss, abs=1e-6)
    m = reward_metrics(chosen, rejected)
    assert m["rewards/accuracies"] / m["count"] == pytest.approx(stub._metrics["train"]["accuracy"][-1])
    assert m["rewards/margins"] / m["count"] == pytest.approx(stub._metrics["train"]["margin"][-1])
