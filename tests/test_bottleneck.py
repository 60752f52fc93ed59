"""Bottleneck adapters on the tiny DeepSeek-V3 (dense + MoE layer) and Qwen2 models."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from r1tune.errors import UserError
from r1tune.models.bottleneck import (
    ATTR, CONFIG, WEIGHTS, BottleneckConfig, attach_bottleneck, bottleneck_state, has_bottleneck,
    load_bottleneck, merge_bottleneck, save_bottleneck,
)

SIZE = 8


@pytest.fixture(params=["tiny_ds", "tiny_qwen"])
def base_path(request):
    return request.getfixturevalue(request.param)


def load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def batch(model):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(5, model.config.vocab_size, (2, 12), generator=gen)


def logits(model, ids, bf16=False):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids=ids).logits


def train(model, ids, steps=6):
    """AdamW on one fixed batch; returns the losses before each step."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def trained(path):
    torch.manual_seed(0)
    model = attach_bottleneck(load(path), BottleneckConfig(size=SIZE))
    train(model, batch(model), steps=3)
    return model


def per_adapter(hidden):
    return 2 * hidden * SIZE + SIZE + hidden


def test_attach_starts_exactly_at_base(base_path):
    model = load(base_path)
    ids = batch(model)
    before, generated = logits(model, ids), model.generate(ids, max_new_tokens=4, do_sample=False)
    assert not has_bottleneck(model)
    assert attach_bottleneck(model, BottleneckConfig(size=SIZE)) is model
    assert has_bottleneck(model)
    assert torch.equal(logits(model, ids), before)
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), generated)  # KV-cache path too


def test_only_adapters_train_and_count_matches_formula(tiny_ds):
    model = attach_bottleneck(load(tiny_ds), BottleneckConfig(size=SIZE))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{ATTR}." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    assert sum(p.numel() for p in trainable.values()) == layers * 2 * per_adapter(hidden)
    assert set(bottleneck_state(model)) == {f"layers.{i}.{place}.{lin}.{kind}" for i in range(layers)
                                            for place in ("attention", "mlp") for lin in ("down", "up")
                                            for kind in ("weight", "bias")}


def test_training_lowers_loss_and_changes_outputs(base_path):
    torch.manual_seed(0)
    model = load(base_path)
    ids = batch(model)
    base = logits(model, ids)
    attach_bottleneck(model, BottleneckConfig(size=SIZE))
    losses = train(model, ids)
    assert losses[-1] < losses[0] - 0.5, losses
    assert not torch.allclose(logits(model, ids), base)


@pytest.mark.parametrize("bf16", [False, True])
def test_save_load_gives_identical_logits(tiny_ds, tmp_path, bf16):
    model = trained(tiny_ds)
    save_bottleneck(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted([CONFIG, WEIGHTS])  # no temp files
    meta = json.loads((tmp_path / "adapter" / CONFIG).read_text())
    assert meta == {"size": SIZE, "where": "both", "activation": "gelu", "num_layers": 2, "hidden_size": 64,
                    "base_model_name_or_path": str(tiny_ds)}
    fresh = load_bottleneck(load(tiny_ds), tmp_path / "adapter")
    ids = batch(model)
    assert (logits(fresh, ids, bf16) - logits(model, ids, bf16)).abs().max().item() == 0
    assert not any(p.requires_grad for p in fresh.parameters())
    again = load_bottleneck(load(tiny_ds), tmp_path / "adapter", trainable=True)
    trainable = {n for n, p in again.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in again.named_parameters() if f".{ATTR}." in n}


def test_base_names_and_state_dict_keys_unchanged(base_path):
    model = load(base_path)
    names, keys = [n for n, _ in model.named_parameters()], list(model.state_dict())
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    attach_bottleneck(model, BottleneckConfig(size=SIZE))
    assert [n for n, _ in model.named_parameters() if f".{ATTR}." not in n] == names
    assert [k for k in model.state_dict() if f".{ATTR}." not in k] == keys
    result = model.load_state_dict(base_state, strict=False)  # a base checkpoint still loads by name
    assert not result.unexpected_keys and all(f".{ATTR}." in k for k in result.missing_keys)


@pytest.mark.parametrize("where,block", [("attention", "self_attn"), ("mlp", "mlp")])
def test_where_adds_only_those_adapters(tiny_ds, where, block):
    model = load(tiny_ds)
    ids = batch(model)
    base = logits(model, ids)
    attach_bottleneck(model, BottleneckConfig(size=SIZE, where=where))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(f".{block}.{ATTR}." in n for n in trainable)
    assert sum(p.numel() for p in bottleneck_state(model).values()) == 2 * per_adapter(64)
    assert all(k.split(".")[2] == where for k in bottleneck_state(model))
    assert torch.equal(logits(model, ids), base)


def test_adapters_follow_input_dtype_and_keep_fp32_params(tiny_qwen):
    model = attach_bottleneck(load(tiny_qwen, torch.bfloat16), BottleneckConfig(size=SIZE))
    assert all(p.dtype == torch.float32 for p in bottleneck_state(model).values())
    assert logits(model, batch(model)).dtype == torch.bfloat16


def test_gradient_checkpointing_and_deepcopy_keep_adapters_working(tiny_qwen):
    model = attach_bottleneck(load(tiny_qwen), BottleneckConfig(size=SIZE))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = batch(model)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if n.endswith("up.weight") and ATTR in n)
    copied = copy.deepcopy(model.eval())
    with torch.no_grad():  # the copy's hooks must use the copy's adapters, not the original's
        for p in bottleneck_state(copied).values():
            p.add_(0.5)
    assert not torch.equal(logits(copied, ids), logits(model, ids))


def edit_config(folder, **changes):
    meta = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**meta, **changes}))


def edit_weights(folder, change):
    state = load_file(str(folder / WEIGHTS))
    change(state)
    save_file(state, str(folder / WEIGHTS))


@pytest.mark.parametrize("damage,message", [
    (shutil.rmtree, "does not exist"),
    (lambda f: (f / WEIGHTS).unlink(), WEIGHTS),
    (lambda f: (f / CONFIG).unlink(), CONFIG),
    (lambda f: (f / CONFIG).write_text("{"), "not a valid"),
    (lambda f: (f / WEIGHTS).write_bytes(b"junk"), "cannot be read"),
    (lambda f: edit_config(f, hidden_size=32), "hidden_size=32"),
    (lambda f: edit_config(f, num_layers=3), "num_layers=3"),
    (lambda f: edit_config(f, size=4), "wrong shape"),
    (lambda f: edit_config(f, where="sideways"), "where"),
    (lambda f: edit_weights(f, lambda s: s.pop("layers.1.mlp.up.bias")), "missing"),
    (lambda f: edit_weights(f, lambda s: s.update(extra=torch.zeros(1))), "unexpected"),
])
def test_load_errors_are_user_errors(tiny_qwen, tiny_ds, tmp_path, damage, message):
    folder = tmp_path / "adapter"
    save_bottleneck(attach_bottleneck(load(tiny_qwen), BottleneckConfig(size=SIZE)), folder)
    damage(folder)
    target = load(tiny_ds)
    with pytest.raises(UserError, match=message) as info:
        load_bottleneck(target, folder)
    assert str(folder) in str(info.value)
    assert not has_bottleneck(target)  # a failed load leaves the model as it was


def test_bad_config_and_double_attach_are_user_errors(tiny_qwen):
    model = load(tiny_qwen)
    with pytest.raises(UserError, match="did you mean 'gelu'"):
        attach_bottleneck(model, BottleneckConfig(activation="gelut"))
    with pytest.raises(UserError, match="positive"):
        attach_bottleneck(model, BottleneckConfig(size=0))
    attach_bottleneck(model, BottleneckConfig(size=SIZE))
    with pytest.raises(UserError, match="already"):
        attach_bottleneck(model, BottleneckConfig(size=SIZE))


def test_merge_is_refused(tiny_qwen):
    model = attach_bottleneck(load(tiny_qwen), BottleneckConfig(size=SIZE))
    with pytest.raises(UserError, match="cannot be merged"):
        merge_bottleneck(model)
