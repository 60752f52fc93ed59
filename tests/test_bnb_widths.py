"""Layers whose width bitsandbytes' CPU 4-bit kernel cannot pack (not a multiple of 32): QLoRA trains,
evaluates and chats, and the 4-bit export keeps them fp32, so the copy runs with plain transformers
on every CPU. On CPUs with AVX-512 BF16 (the kernel's home) these tests fail without the fallbacks;
elsewhere they check the same files and outputs."""

import json

import pytest
import torch

pytest.importorskip("bitsandbytes")

from bitsandbytes.nn import Linear4bit  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from r1tune.models.quantize import cpu_4bit_misfits, fits_cpu_4bit  # noqa: E402
from r1tune.models.tiny import build_tiny  # noqa: E402
from tests.conftest import make_cfg  # noqa: E402

ODD_WIDTH = 176  # MLP width of a 64-wide model at 2.75x: 176 % 32 == 16


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory):
    """A tiny Qwen2 whose MLP gate/up projections are 176 wide."""
    folder = build_tiny(tmp_path_factory.mktemp("models") / "odd", "qwen2", hidden_size=64, num_layers=2)
    config = AutoConfig.from_pretrained(folder)
    config.intermediate_size = ODD_WIDTH
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_bitsandbytes_still_has_the_switch_we_turn_off():
    """keep_4bit_layout relies on this attribute; an upgrade that renames it must fail here, not for users."""
    assert hasattr(Linear4bit(64, 64), "support_avx512bf16_for_cpu")


def test_misfits_are_found_on_a_weightless_model(odd_model):
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(odd_model))
    misfits = cpu_4bit_misfits(skeleton)
    assert set(misfits) == {f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")}
    assert misfits["model.layers.0.mlp.up_proj"] == (64, ODD_WIDTH)  # output rows not in blocks of 32
    assert misfits["model.layers.0.mlp.down_proj"] == (ODD_WIDTH, 64)  # input not in 64-wide blocks
    assert fits_cpu_4bit(64, 64) and not fits_cpu_4bit(64, ODD_WIDTH) and not fits_cpu_4bit(ODD_WIDTH, 64)


def test_qlora_trains_and_evaluates_on_odd_widths(odd_model, parity_file, tmp_path):
    from r1tune.train.stages.sft import run_sft

    cfg = make_cfg(odd_model, parity_file, tmp_path / "out", quantization_bit=4, lora_rank=4, max_steps=2,
                   val_size=8, eval_steps=1, eval_generate_samples=2, max_new_tokens=4)
    result = run_sft(cfg)
    assert result.global_step == 2 and torch.isfinite(torch.tensor([result.last_loss, result.eval_loss])).all()


def test_4bit_export_keeps_odd_layers_fp32_and_runs_with_plain_transformers(odd_model, tmp_path):
    from r1tune.export.bnb_export import quantize_bnb

    report = quantize_bnb(odd_model, tmp_path / "bnb-4bit", 4)
    assert report.passed
    note = next(n for n in report.notes if "stay fp32" in n)
    assert "6 linear layers" in note and f"mlp.gate_proj (64 -> {ODD_WIDTH})" in note
    quant = json.loads((tmp_path / "bnb-4bit" / "config.json").read_text())["quantization_config"]
    assert "lm_head" in quant["llm_int8_skip_modules"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb-4bit").eval()  # nothing from r1tune
    mlp = plain.model.layers[0].mlp
    assert type(mlp.gate_proj) is torch.nn.Linear and type(mlp.down_proj) is torch.nn.Linear
    assert isinstance(plain.model.layers[0].self_attn.q_proj, Linear4bit)
    assert not isinstance(plain.lm_head, Linear4bit)
    with torch.no_grad():  # eval + no grad: the path where the CPU kernel repacks weights
        logits = plain(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()
