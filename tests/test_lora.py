"""Which weights get LoRA, and adapters reload with the same logits."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from r1tune.errors import UserError
from r1tune.models.methods import attach_lora, load_lora, resolve_lora_targets
from r1tune.train.stages.sft import run_sft
from tests.conftest import make_cfg


def adapted(model) -> set[str]:
    """Short names ('self_attn.q_a_proj', 'mlp.shared_experts.up_proj', 'mlp.experts', ...) that hold LoRA weights."""
    names = set()
    for name, _ in model.named_parameters():
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0].replace(".base_layer", "")
            names.add(module.split(".layers.")[1].split(".", 1)[1])
    return names


def load(path):
    return AutoModelForCausalLM.from_pretrained(path)


def test_all_covers_every_projection_on_deepseek_v3(tiny_ds):
    targets = resolve_lora_targets(load(tiny_ds), "all", include_experts=True)
    model = attach_lora(load(tiny_ds), 4, 8, 0.0, targets)
    assert adapted(model) == {
        "self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",  # dense first layer
        "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj",
        "mlp.experts"}  # fused routed experts
    assert not any("mlp.gate.lora" in n for n, _ in model.named_parameters())  # router untouched


def test_presets_and_expert_switch(tiny_ds):
    base = load(tiny_ds)
    attention = resolve_lora_targets(base, "attention", True)
    assert attention.parameters == [] and all(".self_attn." in n for n in attention.modules)
    no_experts = resolve_lora_targets(base, "mlp", include_experts=False)
    assert no_experts.parameters == [] and all(".mlp." in n for n in no_experts.modules)
    named = resolve_lora_targets(base, "q_b_proj,o_proj", True)
    assert {n.rsplit(".", 1)[1] for n in named.modules} == {"q_b_proj", "o_proj"}
    with pytest.raises(UserError, match="no linear layer is named 'q_proj'; use all, attention, mlp or names from: .*kv_b_proj"):
        resolve_lora_targets(base, "q_proj", True)


def randomise_lora(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


def test_plain_peft_reload_matches_on_qwen2(tiny_qwen, tmp_path):
    model = attach_lora(load(tiny_qwen), 4, 8, 0.0, resolve_lora_targets(load(tiny_qwen), "all", True))
    randomise_lora(model)
    x = torch.randint(5, 500, (2, 12))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load(tiny_qwen), tmp_path / "adapter")  # plain PEFT
    with torch.no_grad():
        got = reloaded(input_ids=x).logits
    assert (got - expected).abs().max() < 1e-5 and (expected - load(tiny_qwen)(input_ids=x).logits).abs().max() > 1e-2


def test_reload_matches_on_deepseek_v3(tiny_ds, tmp_path):
    x = torch.randint(5, 500, (2, 12))
    # attention-only adapters reload with plain PEFT; adapters on MLP/experts need r1tune's loader
    # (PEFT 0.21 remaps gate/up/down_proj targets onto the fused experts on reload).
    for target, loader in (("attention", lambda m, p: PeftModel.from_pretrained(m, p)), ("all", load_lora)):
        model = attach_lora(load(tiny_ds), 4, 8, 0.0, resolve_lora_targets(load(tiny_ds), target, True))
        randomise_lora(model)
        with torch.no_grad():
            expected = model(input_ids=x).logits
        model.save_pretrained(tmp_path / target)
        with torch.no_grad():
            got = loader(load(tiny_ds), tmp_path / target)(input_ids=x).logits
        assert (got - expected).abs().max() < 1e-5, target


def test_trained_adapter_reloads_with_same_logits(tiny_qwen, parity_file, tmp_path):
    out = tmp_path / "out"
    run_sft(make_cfg(tiny_qwen, parity_file, out, max_steps=3))
    from r1tune.models.run_loading import load_run

    ours, _ = load_run(str(out))
    plain = PeftModel.from_pretrained(load(tiny_qwen), out)
    x = torch.randint(5, 500, (1, 10))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=x).logits, plain(input_ids=x).logits, atol=1e-5)
