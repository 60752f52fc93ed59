"""The optimizer factory: names, groups (decay, LoRA+), each optimizer's learning and checkpoint round trip."""

import io
import sys

import pytest
import torch

from r1tune.errors import UserError
from r1tune.train.optimizers import (OPTIMIZERS, Lion, build_optimizer, canonical_optim, param_groups,
                                     set_learning_rate)

CANONICAL = sorted(set(OPTIMIZERS.values()))
# a learning rate that fits the toy problem in ~50 steps (Lion moves every coordinate by lr per step)
LR = {"adamw": 5e-2, "adamw_fused": 5e-2, "adamw_8bit": 5e-2, "lion": 2e-2, "lion_8bit": 2e-2, "adafactor": 5e-2}


def test_every_canonical_optimizer_is_tested_and_accepted():
    assert set(LR) == set(CANONICAL)
    assert all(canonical_optim(name) == name for name in CANONICAL)


@pytest.mark.parametrize("name, canonical", [
    ("adamw_torch", "adamw"), ("adamw", "adamw"), ("adamw_torch_fused", "adamw_fused"), ("lion", "lion"),
    ("lion_32bit", "lion"), ("adamw_8bit", "adamw_8bit"), ("adamw_bnb_8bit", "adamw_8bit"),
    ("paged_adamw_8bit", "adamw_8bit"), ("lion_8bit", "lion_8bit"), ("paged_lion_8bit", "lion_8bit"),
    ("adafactor", "adafactor"), ("AdamW_Torch", "adamw"),
])
def test_hf_names_map_to_canonical(name, canonical):
    assert canonical_optim(name) == canonical


def test_unknown_name_suggests_close_match():
    with pytest.raises(UserError) as err:
        canonical_optim("adamw_8bt", source="run.yaml")
    msg = str(err.value)
    assert msg.startswith("run.yaml:") and "'optim'" in msg and "'adamw_8bt'" in msg
    assert "did you mean 'adamw_8bit'" in msg and "adafactor" in msg  # the valid choices are listed


def _problem(seed=0):
    """A 64x64 linear map (4096 weights: large enough for bitsandbytes to keep 8-bit state) plus a bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 64, generator=g)
    y = x @ torch.randn(64, 64, generator=g) * 0.1 + 0.1
    model = torch.nn.Linear(64, 64)
    torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
    return model, x, y


def _step(model, opt, x, y) -> float:
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


@pytest.mark.parametrize("optim", CANONICAL)
def test_optimizer_reduces_least_squares_loss(optim):
    model, x, y = _problem()
    opt = build_optimizer(model.named_parameters(), optim, lr=LR[optim], weight_decay=0.0)
    losses = [_step(model, opt, x, y) for _ in range(50)]
    assert losses[-1] < 0.2 * losses[0], losses[::10]


@pytest.mark.parametrize("optim", CANONICAL)
def test_state_round_trips_through_weights_only_load(optim):
    model, x, y = _problem()
    opt = build_optimizer(model.named_parameters(), optim, lr=LR[optim], weight_decay=0.1)
    for _ in range(5):
        _step(model, opt, x, y)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    if optim.endswith("8bit"):  # the state really is 8-bit, not bitsandbytes' 32-bit fallback for small tensors
        assert saved["state"][0]["__bnb_optimizer_quant_state__"]["state1"].dtype == torch.uint8

    def fresh(load: bool):
        clone, _, _ = _problem()
        clone.load_state_dict(weights)
        new = build_optimizer(clone.named_parameters(), optim, lr=LR[optim], weight_decay=0.1)
        if load:
            new.load_state_dict(saved)
        _step(clone, new, x, y)
        return clone.weight.detach()

    _step(model, opt, x, y)
    assert torch.equal(fresh(load=True), model.weight.detach())
    assert not torch.equal(fresh(load=False), model.weight.detach())  # the loaded state mattered


def test_lion_step_matches_reference_formula():
    lr, wd, (b1, b2) = 0.1, 0.5, (0.9, 0.99)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    opt = Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    ref, m = p.detach().clone(), torch.zeros(4)
    # the last coordinate's sign on step 2 depends on beta1 (not beta2) weighting the momentum
    for g in (torch.tensor([0.3, -0.1, 0.0, 5.0]), torch.tensor([-0.5, -0.2, 0.1, -1.0])):
        p.grad = g.clone()
        opt.step()
        ref = ref * (1 - lr * wd) - lr * torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
        assert torch.allclose(p.detach(), ref, atol=1e-6)
        assert torch.allclose(opt.state[p]["exp_avg"], m, atol=1e-6)


def _lora_model():
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.proj = torch.nn.Linear(8, 8)

    return get_peft_model(Net(), LoraConfig(r=2, target_modules=["emb", "proj"]))


def test_loraplus_lrs_follow_the_schedule():
    model = _lora_model()
    opt = build_optimizer(model.named_parameters(), "adamw", lr=1e-3, weight_decay=0.0,
                          loraplus_lr_ratio=16.0, loraplus_lr_embedding=1e-6)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["base_model.model.emb.lora_embedding_B.default"])] == pytest.approx(1e-6)
    set_learning_rate(opt, 5e-4)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    expected = {"proj.lora_A.default.weight": 5e-4, "proj.lora_B.default.weight": 8e-3,
                "emb.lora_embedding_A.default": 5e-4, "emb.lora_embedding_B.default": 5e-7}
    assert {n.removeprefix("base_model.model."): pytest.approx(lr_of[id(p)]) for n, p in named.items()
            if p.requires_grad} == expected  # frozen base weights are in no group
    assert all(g["params"] for g in opt.param_groups)


def test_without_loraplus_every_group_has_scale_one():
    model = _lora_model()
    opt = build_optimizer(model.named_parameters(), "lion", lr=1e-4, weight_decay=0.1)
    set_learning_rate(opt, 2e-5)
    assert {(g["lr_scale"], g["lr"]) for g in opt.param_groups} == {(1.0, 2e-5)}


def test_weight_decay_groups_and_no_decay_names():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))
    net[2].requires_grad_(False)
    groups = param_groups(net.named_parameters(), 0.1, no_decay_names={"0.weight"})
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert [decay_of.get(id(p)) for p in net.parameters()] == [0.0, 0.0, 0.0, 0.0, None, None]
    groups = param_groups(net.named_parameters(), 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and len(groups[0]["params"]) == 1


def test_no_decay_names_are_not_shrunk():
    w, masked = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3, 3))
    opt = build_optimizer([("w", w), ("experts", masked)], "adamw", lr=0.1, weight_decay=0.5,
                          no_decay_names={"experts"})
    w.grad, masked.grad = torch.zeros(3, 3), torch.zeros(3, 3)  # a masked gradient
    opt.step()
    assert torch.equal(masked.detach(), torch.ones(3, 3)) and (w.detach() < 1).all()


def test_fused_adamw_is_fused_and_rejects_unsupported_devices():
    model, _, _ = _problem()
    assert build_optimizer(model.named_parameters(), "adamw_torch_fused", 1e-3, 0.0).defaults["fused"] is True
    assert not build_optimizer(model.named_parameters(), "adamw_torch", 1e-3, 0.0).defaults["fused"]
    meta = torch.nn.Parameter(torch.empty(2, 2, device="meta"))
    with pytest.raises(UserError, match="adamw_torch_fused.*use optim: adamw_torch"):
        build_optimizer([("w", meta)], "adamw_torch_fused", 1e-3, 0.0)


def test_adafactor_lr_is_an_absolute_step_even_from_zero_init():
    w = torch.nn.Parameter(torch.zeros(8, 8))  # like LoRA B
    opt = build_optimizer([("w", w)], "adafactor", lr=1e-2, weight_decay=0.0)
    w.grad = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    opt.step()
    assert w.detach().pow(2).mean().sqrt().item() == pytest.approx(1e-2, rel=0.05)


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_lion_8bit"])
def test_missing_bitsandbytes_names_the_fix(monkeypatch, optim):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(UserError, match=r"needs bitsandbytes \(`pip install bitsandbytes`\).*optim: adamw_torch"):
        build_optimizer([("w", torch.nn.Parameter(torch.ones(2, 2)))], optim, 1e-3, 0.0)


def test_no_trainable_parameters_is_a_user_error():
    with pytest.raises(UserError, match="no parameter is trainable"):
        build_optimizer([("w", torch.nn.Parameter(torch.ones(2), requires_grad=False))], "adamw", 1e-3, 0.0)
