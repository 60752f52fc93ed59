"""The decoding speed-ups behind GRPO's rollouts change no numbers: the lean decode step equals the model's
own forward, folded LoRA equals PEFT's layers and leaves the base weights bit-exact, and batched sampling
draws from each row's own distribution."""

import copy

import pytest
import torch

from r1tune.models.decode import new_cache
from r1tune.models.lean_decode import lean_step
from r1tune.models.lora_fold import folded_lora
from r1tune.models.sampling import Params, sample_rows
from r1tune.models.tiny import build_tiny


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("models") / "llama", "llama", hidden_size=64, num_layers=2)


def _load(path, lora: bool = False):
    from peft import LoraConfig, get_peft_model

    from r1tune.models.loading import load_model

    model = load_model(str(path)).eval()
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        with torch.no_grad():  # PEFT starts B at zero: make the adapter change something
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        model.eval()
    return model


def _prefill(model, rows: list[list[int]]):
    width = max(map(len, rows))
    ids = torch.tensor([[2] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    cache = new_cache(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), cache=cache)
    return mask, cache


@pytest.mark.parametrize("arch", ["qwen", "llama"])
@pytest.mark.parametrize("lora", [False, True])
def test_lean_step_equals_the_model_forward(arch, lora, tiny_qwen, tiny_llama):
    model = _load(tiny_qwen if arch == "qwen" else tiny_llama, lora)
    step = lean_step(model)
    assert step is not None
    mask, cache = _prefill(model, [[5, 9, 14, 20, 7], [11, 3, 8]])  # left padding in the second row
    mine, theirs = cache, copy.deepcopy(cache)
    positions = mask.sum(1, keepdim=True)
    ids = torch.tensor([[30], [31]])
    for _ in range(3):
        mask = torch.nn.functional.pad(mask, (0, 1), value=1)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=theirs).logits[:, -1]
        got = step(ids, mask, positions, mine)
        assert (got - want).abs().max() <= 1e-5
        for a, b in zip(mine.layers, theirs.layers):
            assert torch.allclose(a.keys, b.keys, atol=1e-6) and torch.allclose(a.values, b.values, atol=1e-6)
        ids, positions = got.argmax(-1, keepdim=True), positions + 1


def test_lean_step_leaves_other_models_to_their_forward(tiny_ds, tiny_qwen):
    assert lean_step(_load(tiny_ds)) is None  # DeepSeek-V3: MLA and MoE
    model = _load(tiny_qwen)
    model.model.layers[0].self_attn.register_forward_hook(lambda module, args, out: out)  # e.g. bottleneck adapters
    assert lean_step(model) is None


def test_folded_lora_equals_peft_and_restores_the_exact_base(tiny_qwen):
    model = _load(tiny_qwen, lora=True)
    ids = torch.tensor([[5, 9, 14, 20, 7, 30]])
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    layers = {n: m for n, m in model.named_modules()}
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with folded_lora(model) as folded:
            got = model(input_ids=ids).logits
            assert folded == 14  # 7 linears in each of 2 layers
            assert type(model.base_model.model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert (got - want).abs().max() <= 1e-5 and not torch.equal(got, model.get_base_model()(input_ids=ids).logits)
    assert {n: m for n, m in model.named_modules()}.keys() == layers.keys()
    assert all(m is layers[n] for n, m in model.named_modules())
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)


def test_dora_and_disabled_adapters_are_not_folded(tiny_qwen):
    from peft import LoraConfig, get_peft_model

    from r1tune.models.loading import load_model

    dora = get_peft_model(load_model(str(tiny_qwen)), LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    with folded_lora(dora) as folded:
        assert folded == 0
    model = _load(tiny_qwen, lora=True)
    with model.disable_adapter(), folded_lora(model) as folded:
        assert folded == 0


def test_sampling_draws_from_each_rows_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
    params = [Params(1, temperature=1.0, seed=1), Params(1, temperature=0.5, top_p=0.8, seed=2)]
    draws = torch.stack([sample_rows(logits, params) for _ in range(4000)])
    first = torch.bincount(draws[:, 0], minlength=4) / len(draws)
    assert (first - torch.softmax(logits[0], -1)).abs().max() < 0.03
    assert draws[:, 1].eq(2).all()  # at temperature 0.5 token 2 holds > 0.8 of the mass: top_p keeps it alone
    again = [Params(1, temperature=1.0, seed=1), Params(1, temperature=0.5, top_p=0.8, seed=2)]
    assert torch.equal(torch.stack([sample_rows(logits, again) for _ in range(4000)]), draws)  # seeded
