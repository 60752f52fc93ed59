"""Training monitors: gradient-norm alarms, update-size heatmap, plateau LR scaling, early stopping."""

from __future__ import annotations

import math
from collections import deque

import pytest
import torch
from torch import nn

from r1tune.errors import UserError
from r1tune.train.monitor import (Alarm, EarlyStopper, GradNormMonitor, PlateauScheduler, UpdateTracker,
                                  group_name)


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.self_attn, self.mlp = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.mlp(torch.tanh(self.self_attn(x)))


class Tiny(nn.Module):
    """Decoder-shaped names: embed_tokens, layers.N.{self_attn,mlp}, lm_head."""

    def __init__(self, vocab: int = 16, d: int = 8, n: int = 3):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def backward(model, gen: torch.Generator, vocab: int = 16) -> None:
    ids = torch.randint(0, vocab, (64, 12), generator=gen)  # big enough that batch noise stays inside 3 std
    logits = model(ids[:, :-1])
    nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1)).backward()


def run_steps(model, monitor, steps: int, spike: dict | None = None) -> list[Alarm]:
    """SGD steps with real backward passes; spike = {step: group prefix} multiplies that group's grads by 100."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    alarms = []
    for step in range(steps):
        backward(model, gen)
        for name, p in model.named_parameters():
            if spike and step in spike and name.startswith(spike[step] + "."):
                p.grad.mul_(100)
        alarms += monitor.observe(step)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return alarms


def test_group_names():
    assert group_name("model.layers.3.self_attn.q_proj.weight") == "layers.3"
    assert group_name("base_model.model.model.layers.12.mlp.up_proj.lora_A.default.weight",
                      "layer_type") == "layers.12.mlp"
    assert group_name("model.embed_tokens.weight") == "embed"
    assert group_name("lm_head.weight") == "head"
    assert group_name("model.norm.weight") == "other"


def test_spike_fires_one_alarm_for_that_group_and_step():
    # Batch noise alone reaches ~3.5 std within 150 judgments here, so k=3 would be luck; 5 is not.
    torch.manual_seed(0)
    model = Tiny()
    monitor = GradNormMonitor(model, k=5)
    assert run_steps(model, monitor, 30) == []  # normal steps: silent
    torch.manual_seed(0)
    model = Tiny()
    monitor = GradNormMonitor(model, k=5)
    alarms = run_steps(model, monitor, 40, spike={30: "layers.1"})
    assert [(a.step, a.group) for a in alarms] == [(30, "layers.1")]
    assert alarms[0].norm > alarms[0].mean + 5 * alarms[0].std
    before = list(monitor.history["layers.1"])[:30]  # judged against the 30 steps before it, not itself
    assert alarms[0].mean == pytest.approx(sum(before) / 30)
    assert "layers.1" in str(alarms[0]) and "step 30" in str(alarms[0])
    assert set(monitor.norms()) == {"embed", "layers.0", "layers.1", "layers.2", "head"}


def test_no_alarm_during_warmup():
    torch.manual_seed(0)
    model = Tiny()
    monitor = GradNormMonitor(model, warmup=10)
    assert run_steps(model, monitor, 10, spike={5: "layers.0", 9: "head"}) == []
    assert all(len(h) == 10 for h in monitor.history.values())


def test_nonfinite_norm_alarms_and_stays_out_of_history():
    model = Tiny()
    monitor = GradNormMonitor(model, warmup=3)
    run_steps(model, monitor, 5)
    backward(model, torch.Generator().manual_seed(9))
    model.lm_head.weight.grad[0, 0] = math.nan
    alarms = monitor.observe(5)
    assert [a.group for a in alarms] == ["head"] and math.isnan(alarms[0].norm)
    assert len(monitor.history["head"]) == 5 and len(monitor.history["embed"]) == 6


def test_tiny_qwen_groups_and_spike(tiny_qwen):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    monitor = GradNormMonitor(model, k=10, warmup=4, window=10)  # 4 samples: wide band
    gen = torch.Generator().manual_seed(0)
    alarms = []
    for step in range(6):
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        if step == 5:
            for p in model.model.layers[0].parameters():
                p.grad.mul_(100)
        alarms += monitor.observe(step)
        model.zero_grad(set_to_none=True)
    assert {"embed", "layers.0", "layers.1"} <= set(monitor.norms())
    assert [(a.step, a.group) for a in alarms] == [(5, "layers.0")]


def test_update_tracker_matches_hand_computation(tmp_path):
    model = Tiny(d=4, n=2)
    model.embed_tokens.weight.requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    tracker = UpdateTracker(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 2.0)
    model.layers[1].mlp.weight.grad[0] = 0.0  # one row of 4 of 20 weight+bias entries gets no update
    tracker.before_step(0)
    opt.step()
    tracker.after_step(0)
    ratios = tracker.latest()
    assert "embed" not in ratios  # frozen: never snapshotted
    assert ratios["layers.0.mlp"] == pytest.approx(0.2)  # ||0.1·2·1|| / ||1|| over every entry
    assert ratios["layers.1.mlp"] == pytest.approx(0.2 * math.sqrt(16 / 20))
    assert set(ratios) == {"layers.0.self_attn", "layers.0.mlp", "layers.1.self_attn", "layers.1.mlp", "head"}


def test_update_tracker_sampling_and_heatmap(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    tracker = UpdateTracker(model, every=3)
    assert tracker.heatmap(tmp_path / "none.png") is None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(9):
        backward(model, gen)
        tracker.before_step(step)
        opt.step()
        tracker.after_step(step)
        opt.zero_grad()
    assert tracker.steps == [0, 3, 6]
    assert all(len(row) == 3 and all(0 < v < 1 for v in row) for row in tracker.rows.values())
    out = tracker.heatmap(tmp_path / "updates.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1024
    assert [p.name for p in tmp_path.iterdir()] == ["updates.png"]  # no temp file left behind


def test_plateau_reduces_after_patience_with_floor_and_resumes():
    sched = PlateauScheduler(factor=0.5, patience=2, min_scale=0.2)
    assert [sched.update(v) for v in (1.0, 0.9, 0.95, 0.9)] == [False, False, False, True]
    assert sched.scale == 0.5
    assert sched.update(0.8) is False and sched.scale == 0.5  # improvement resets the count
    assert [sched.update(0.8) for _ in range(4)] == [False, True, False, True]
    assert sched.scale == pytest.approx(0.2)  # 0.125 floored at min_scale
    assert [sched.update(0.9) for _ in range(4)] == [False, False, False, False] and sched.scale == pytest.approx(0.2)
    resumed = PlateauScheduler(factor=0.5, patience=2, min_scale=0.2)
    resumed.load_state_dict(sched.state_dict())
    assert (resumed.scale, resumed.best, resumed.bad) == (sched.scale, sched.best, sched.bad)
    up = PlateauScheduler(patience=1, mode="max")
    assert [up.update(v) for v in (0.5, 0.6, 0.55)] == [False, False, True] and up.scale == 0.5
    with pytest.raises(UserError, match="mode"):
        PlateauScheduler(mode="lowest")


def test_early_stopper_modes_and_missing_metric():
    loss = EarlyStopper("eval_loss", patience=2)
    assert loss.mode == "min" and EarlyStopper("perplexity", 1).mode == "min"
    assert [loss.update({"eval_loss": v}) for v in (1.0, 0.8, 0.9, 0.7, 0.75, 0.71)] == [False] * 5 + [True]
    acc = EarlyStopper("accuracy", patience=1)
    assert acc.mode == "max"
    assert [acc.update({"accuracy": v}) for v in (0.5, 0.6, 0.55)] == [False, False, True]
    assert EarlyStopper("bleu", 1, mode="min").mode == "min"
    never = EarlyStopper("loss", patience=0)
    assert not any(never.update({"loss": 1.0}) for _ in range(5))
    with pytest.raises(UserError, match=r"'eval_acuracy'.*eval_accuracy, eval_loss.*did you mean 'eval_accuracy'"):
        EarlyStopper("eval_acuracy", 2).update({"eval_loss": 1.0, "eval_accuracy": 0.5})


def test_ratio_keeps_a_small_rise_quiet_and_a_spike_loud():
    """Against a steady history (std ~0.05), 1.5x the mean is 10 std out but not 2x: no alarm; 3x alarms."""
    model = Tiny()
    monitor = GradNormMonitor(model, k=3, warmup=5, ratio=2.0)
    for step, norm in enumerate([1.0, 1.05, 0.95, 1.0, 1.05, 0.95]):
        monitor.history.setdefault("layers.0", deque(maxlen=100)).append(norm)
    assert monitor._judge(6, "layers.0", 1.5) is None
    assert monitor._judge(6, "layers.0", 3.0) is not None
    assert monitor._judge(6, "layers.0", 0.5) is not None  # falling: the band alone (the watch ignores falls)
    monitor.ratio = 0.0
    assert monitor._judge(6, "layers.0", 1.5) is not None  # the std band alone alarms
