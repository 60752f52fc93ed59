"""The tiny models' layer widths suit every CPU kernel (bitsandbytes' 4-bit CPU kernel needs multiples of 32)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from r1tune.models.quantize import fits_cpu_4bit
from r1tune.models.tiny import ARCHES, model_config


def linear_widths(arch: str, hidden: int) -> dict[str, tuple[int, int]]:
    config = model_config(arch, vocab_size=320, hidden_size=hidden, num_layers=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("hidden", [64, 128, 256, 448, 512, 1024])  # tests, quickstart and bench sizes
def test_every_linear_width_suits_the_cpu_4bit_kernel(arch, hidden):
    widths = linear_widths(arch, hidden)
    assert widths, "no linear layer found"
    odd = {name: w for name, w in widths.items() if not fits_cpu_4bit(*w)}
    assert not odd, f"{arch} hidden {hidden}: widths (in, out) not suited to the CPU kernels: {odd}"


def test_deepseek_tiny_keeps_mla_and_experts():
    config = model_config("deepseek_v3", vocab_size=320, hidden_size=256)
    assert config.kv_lora_rank < config.q_lora_rank < 256  # low-rank projections stay low rank
    assert config.qk_nope_head_dim + config.qk_rope_head_dim != config.v_head_dim  # MLA's unequal head dims
    assert config.n_routed_experts == 8 and config.n_shared_experts == 1


@pytest.mark.parametrize("hidden", [0, 32, 100, 200])
def test_hidden_size_must_be_a_multiple_of_64(hidden):
    with pytest.raises(ValueError, match="multiple of 64"):
        model_config("qwen2", vocab_size=320, hidden_size=hidden)


def test_cli_refuses_a_hidden_size_off_the_grid(tmp_path, capsys):
    from r1tune.cli import main

    assert main(["tiny", str(tmp_path / "m"), "--hidden-size", "100"]) == 2
    err = capsys.readouterr().err
    assert "--hidden-size" in err and "multiple of 64" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
