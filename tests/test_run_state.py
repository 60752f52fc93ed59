"""Per-run state lives in a plain record (MethodState on the lifecycle's Run), never in attributes set on
torch modules or parameters: a DDP/FSDP wrapper or a copy of the model would drop those."""

from __future__ import annotations

import json

import torch

from r1tune.models.experts import restrict_expert_training
from r1tune.models.methods import count_parameters
from r1tune.train.run_dir import save_model
from r1tune.train.stages import lifecycle
from tests.conftest import make_cfg


def _built(tiny_ds, parity_file, tmp_path, **overrides):
    run = lifecycle.prepare(make_cfg(tiny_ds, parity_file, tmp_path / "out", val_size=8, bf16=False, **overrides))
    lifecycle.build_model(run)
    return run


def _own_attributes(model) -> list[str]:
    objects = list(model.modules()) + list(model.parameters())
    return sorted({k for obj in objects for k in vars(obj) if k.startswith("_r1tune_")})


def test_pissa_and_expert_restriction_leave_no_attributes_on_the_model(tiny_ds, parity_file, tmp_path):
    run = _built(tiny_ds, parity_file, tmp_path, lora_rank=4, pissa_init=True, pissa_iter=2, expert_ids="1:2,5")
    assert _own_attributes(run.model) == []
    state = run.method
    assert state.pissa_start is not None and (state.pissa_start / "adapter_config.json").is_file()
    prefix = "base_model.model.model.layers.1.mlp.experts."  # PiSSA leaves the fused experts to masking
    assert set(state.trained_share) == set(state.expert_hooks) == {prefix + "gate_up_proj", prefix + "down_proj"}
    assert all(share == 2 / 8 for share in state.trained_share.values())
    experts = [run.model.get_parameter(n) for n in state.trained_share]
    adapters = sum(p.numel() for n, p in run.model.named_parameters() if p.requires_grad and n not in state.trained_share)
    assert count_parameters(run.model, state.trained_share)[0] == adapters + sum(p.numel() for p in experts) * 2 // 8
    save_model(run.model, tmp_path / "saved", state.pissa_start)  # converted to plain LoRA on the original base
    saved = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True and not state.pissa_start.exists()


def test_restricting_again_with_the_same_record_replaces_the_masks(tiny_ds, parity_file, tmp_path):
    run = _built(tiny_ds, parity_file, tmp_path, finetuning_type="full", expert_ids="1:2,5")
    model, state = run.model, run.method
    masked = restrict_expert_training(model, {1: [0, 1, 3]}, state=state)
    assert masked == set(state.expert_hooks) and all(share == 3 / 8 for share in state.trained_share.values())
    assert all(len(model.get_parameter(n)._backward_hooks) == 1 for n in masked)  # not stacked on the first
    ids = torch.randint(5, 500, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    grad = model.get_parameter(sorted(masked)[0]).grad
    assert grad[[0, 1, 3]].any() and not grad[[2, 4, 5, 6, 7]].any()  # expert 2 and 5's mask is gone
    assert _own_attributes(model) == []
