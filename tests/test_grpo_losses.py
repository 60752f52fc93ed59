"""GRPO's pure pieces (train/grpo_losses.py) against their formulas written out by hand."""

import math

import pytest
import torch

from r1tune.train.grpo_losses import group_advantages, policy_loss


def _std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_group_advantages_per_scale():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two prompts, 4 generations each
    adv, zero = group_advantages(rewards, 4, "group")
    g = _std([1.0, 0.0, 0.0, 1.0])
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (g + 1e-4))
    assert adv[4:].abs().max() == 0
    assert zero.tolist() == [False] * 4 + [True] * 4
    adv_none, _ = group_advantages(rewards, 4, "none")
    assert adv_none.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    adv_batch, _ = group_advantages(rewards, 4, "batch")
    assert torch.allclose(adv_batch, adv_none / (_std(rewards.tolist()) + 1e-4))
    with pytest.raises(ValueError):
        group_advantages(rewards, 4, "per-token")


def test_abstained_rewards_do_not_poison_their_group():
    rewards = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    adv, _ = group_advantages(rewards, 4, "group")
    assert not adv.isnan().any() and adv[1] == 0
    mean, std = 2 / 3, _std([1.0, 0.0, 1.0])
    assert torch.allclose(adv[[0, 2, 3]], (torch.tensor([1.0, 0.0, 1.0]) - mean) / (std + 1e-4))


def _batch():
    torch.manual_seed(0)
    logps = torch.randn(3, 5) * 0.1 - 1.0
    old = logps + torch.randn(3, 5) * 0.3
    ref = logps + torch.randn(3, 5) * 0.2
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    return logps, old, ref, adv, mask


def _per_token(logps, old, adv, eps_low, eps_high):
    out = torch.zeros_like(logps)
    for i in range(logps.size(0)):
        for t in range(logps.size(1)):
            r = math.exp(logps[i, t] - old[i, t])
            a = float(adv[i])
            out[i, t] = -min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
    return out


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_each_loss_type_equals_its_formula(loss_type):
    logps, old, ref, adv, mask = _batch()
    beta, eps_low, eps_high = 0.04, 0.2, 0.28
    per = _per_token(logps, old, adv, eps_low, eps_high)
    diff = ref - logps
    per = per + beta * (diff.exp() - diff - 1)
    masked = per * mask
    expected = {"grpo": sum(float(masked[i].sum() / mask[i].sum()) for i in range(3)) / 3,
                "bnpo": float(masked.sum() / mask.sum()),
                "dr_grpo": float(masked.sum()) / (3 * 8),
                "dapo": float(masked.sum()) / 20.0}[loss_type]
    loss, stats = policy_loss(logps, old, adv, mask, loss_type, eps_low, eps_high, beta=beta, ref_logps=ref,
                              max_completion_length=8, num_tokens=20)
    assert math.isclose(float(loss), expected, rel_tol=1e-5), (float(loss), expected)
    assert stats["kl"] > 0


def test_one_iteration_is_the_policy_gradient():
    """num_iterations 1: old = current (detached), ratio 1, so the gradient is -A x grad log p per token."""
    logps, _, _, adv, mask = _batch()
    logps.requires_grad_(True)
    loss, stats = policy_loss(logps, logps.detach(), adv, mask, "bnpo")
    loss.backward()
    expected = -(adv[:, None] * mask) / mask.sum()
    assert torch.allclose(logps.grad, expected, atol=1e-7)
    assert math.isclose(float(loss.detach()), float(-(adv[:, None] * mask).sum() / mask.sum()), rel_tol=1e-6)
    assert stats["clip_ratio/region_mean"] == 0


def test_clip_shares_count_only_clipping_that_changes_the_loss():
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    _, stats = policy_loss(logps, torch.zeros(1, 4), adv, torch.ones(1, 4), "bnpo", 0.2, 0.28)
    assert stats["clip_ratio/high_mean"] == 0.25 and stats["clip_ratio/low_mean"] == 0.25
    assert stats["clip_ratio/region_mean"] == 0.5


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_each_loss_type_equals_trls(loss_type):
    """TRL's GRPOTrainer._compute_loss on the same tensors (its model call and logging stubbed)."""
    from collections import defaultdict
    from types import SimpleNamespace

    grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    logps, old, ref, adv, mask = _batch()
    accelerator = SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x,
                                  gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=0.04, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
        use_vllm=False, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=8, accelerator=accelerator, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    inputs = {"prompt_ids": torch.zeros(3, 2, dtype=torch.long), "prompt_mask": torch.ones(3, 2),
              "completion_ids": torch.zeros(3, 5, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": torch.tensor(20.0)}
    theirs = grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    ours, stats = policy_loss(logps, old, adv, mask, loss_type, 0.2, 0.28, beta=0.04, ref_logps=ref,
                              max_completion_length=8, num_tokens=20)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7), (ours, theirs)
    metrics = fake._metrics["train"]
    for name in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert math.isclose(stats[name], metrics[name][0], rel_tol=1e-5, abs_tol=1e-7), name
