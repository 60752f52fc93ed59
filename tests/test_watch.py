"""Monitoring during training: gradient alarm on an injected spike, generation metrics, lr plateau,
early stopping on a generation metric, the update heatmap, and the watch state in checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from r1tune.train.logs import read_log
from r1tune.train.stages.sft import run_sft
from tests.conftest import make_cfg


def test_gradient_alarm_fires_on_an_injected_spike_and_stops(tiny_qwen, parity_file, tmp_path, monkeypatch):
    from r1tune.train.engine import Engine

    spiked = {"step": 14}
    original = Engine._apply_update

    def spike_then_update(self, step):
        if step == spiked["step"]:  # 1000x gradients in one layer, as a bad batch would give
            for name, p in self.model.named_parameters():
                if ".layers.1." in name and p.grad is not None:
                    p.grad.mul_(1000.0)
        return original(self, step)

    monkeypatch.setattr(Engine, "_apply_update", spike_then_update)
    out = tmp_path / "out"
    result = run_sft(make_cfg(tiny_qwen, parity_file, out, max_steps=30, grad_norm_alarm="stop",
                              grad_norm_alarm_std=6.0, bf16=False, learning_rate=1e-3))
    alarms = [r for r in read_log(out) if r.get("split") == "alarm"]
    assert alarms and {a["step"] for a in alarms} == {14} and {a["group"] for a in alarms} == {"layers.1"}
    assert result.stopped_early and result.global_step == 15
    assert (out / "checkpoint-15" / "trainer_state.json").is_file()
    train = [r for r in read_log(out) if r.get("split") == "train"]
    assert "grad_norm/layers.0" in train[0] and "grad_norm/layers.1" in train[0]


def test_no_alarm_without_a_spike(tiny_qwen, parity_file, tmp_path):
    out = tmp_path / "out"
    result = run_sft(make_cfg(tiny_qwen, parity_file, out, max_steps=30, grad_norm_alarm="stop",
                              grad_norm_alarm_std=6.0, bf16=False, learning_rate=1e-3))
    assert not result.stopped_early and not [r for r in read_log(out) if r.get("split") == "alarm"]


def test_generation_metrics_plateau_and_early_stopping_on_a_metric(tiny_qwen, parity_file, tmp_path):
    out = tmp_path / "out"
    result = run_sft(make_cfg(tiny_qwen, parity_file, out, max_steps=12, val_size=8, eval_steps=2, report_to="tensorboard",
                              generate_metrics_steps=2, eval_generate_samples=4, max_new_tokens=6,
                              metric_for_best_model="exact_match", early_stopping_patience=3,
                              lr_plateau_patience=1, lr_plateau_factor=0.5, bf16=False))
    log = read_log(out)
    generated = [r for r in log if r.get("split") == "generate"]
    assert generated and {"exact_match", "bleu4", "rouge_l"} <= set(generated[0])
    plateaus = [r["lr_scale"] for r in log if r.get("split") == "plateau"]
    assert plateaus[:2] == [0.5, 0.25]  # an untrained tiny model never improves exact match past its first value
    assert result.stopped_early and result.global_step == 8  # best at step 2, then 3 evaluations without
    assert (out / "update_heatmap.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs")).Reload()
    assert "update_heatmap" in events.Tags()["images"]
    assert {"generate/exact_match", "plateau/lr_scale", "train/grad_norm/layers.1"} <= set(events.Tags()["scalars"])


def test_watch_state_is_checkpointed(tiny_qwen, parity_file, tmp_path):
    out = tmp_path / "out"
    run_sft(make_cfg(tiny_qwen, parity_file, out, max_steps=4, save_steps=2, val_size=8, eval_steps=2,
                     early_stopping_patience=5, bf16=False))
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["watch"]["stopper"]["best"] is not None


def test_a_metric_no_evaluation_measures_is_a_config_error():
    from r1tune.config import validate_config
    from r1tune.errors import UserError

    base = {"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "val_size": 8, "eval_steps": 2}
    with pytest.raises(UserError, match="'metric_for_best_model' is 'accuracy'.*generate_metrics_steps"):
        validate_config({**base, "metric_for_best_model": "accuracy"})
    validate_config({**base, "metric_for_best_model": "accuracy", "generate_metrics_steps": 2})
