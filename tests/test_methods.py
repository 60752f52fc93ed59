"""Every fine-tuning method, end to end on tiny DeepSeek-V3 (MoE + MLA) and Qwen2 models.

For each: a short `run_sft` whose held-out loss falls; the saved output reloaded through
r1tune's loader gives the trained model's logits; where the method merges, merged logits
equal unmerged ones (max abs diff <= 1e-4, fp32).
"""

from __future__ import annotations

import json

import pytest
import torch

from r1tune.models.run_loading import load_run
from r1tune.train.stages.sft import run_sft
from tests.conftest import make_cfg

LORA_LIKE = dict(lora_rank=4, learning_rate=3e-3)
METHODS = {
    "lora": LORA_LIKE,
    "dora": {**LORA_LIKE, "use_dora": True},
    "rslora": {**LORA_LIKE, "use_rslora": True},
    "pissa": {**LORA_LIKE, "pissa_init": True, "pissa_iter": 2, "learning_rate": 1e-3},
    "loraplus": {**LORA_LIKE, "loraplus_lr_ratio": 4.0, "learning_rate": 1e-3},
    "adalora": {"finetuning_type": "adalora", "adalora_init_r": 6, "adalora_target_r": 3, "adalora_tinit": 2,
                "adalora_tfinal": 3, "learning_rate": 3e-3, "adalora_orth_reg_weight": 0.1},
    "qlora4": {**LORA_LIKE, "quantization_bit": 4},
    "qlora8": {**LORA_LIKE, "quantization_bit": 8},
    "prompt_tuning": {"finetuning_type": "prompt_tuning", "num_virtual_tokens": 4, "learning_rate": 3e-2},
    "prefix_tuning": {"finetuning_type": "prefix_tuning", "num_virtual_tokens": 4, "learning_rate": 3e-2},
    "p_tuning": {"finetuning_type": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 32, "learning_rate": 1e-2},
    "bottleneck": {"finetuning_type": "bottleneck", "bottleneck_size": 16, "learning_rate": 3e-3},
    "freeze": {"finetuning_type": "freeze", "freeze_trainable_layers": 1, "learning_rate": 1e-3},
    "full": {"finetuning_type": "full", "learning_rate": 1e-3},
}
MERGEABLE = {"lora", "dora", "rslora", "pissa", "loraplus", "adalora"}
SKIP = {("deepseek_v3", "prefix_tuning"): "MLA caches a compressed latent; a clear error is tested instead"}


def run_method(model_dir, data, out, **overrides):
    cfg = make_cfg(model_dir, data, out, **{"max_steps": 8, "val_size": 8, "bf16": False, **overrides})
    result = run_sft(cfg)
    scores = json.loads((out / "eval_results.json").read_text())
    return result, scores


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits.float()


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_saves_reloads_merges(method, arch, tiny_ds, tiny_qwen, parity_file, tmp_path):
    if (arch, method) in SKIP:
        pytest.skip(SKIP[(arch, method)])
    model_dir = tiny_ds if arch == "deepseek_v3" else tiny_qwen
    result, scores = run_method(model_dir, parity_file, tmp_path / "out", **METHODS[method])
    assert scores["after"]["eval_loss"] < scores["before"]["eval_loss"], scores
    x = torch.randint(5, 500, (2, 12))
    trained = logits(result.model, x)
    reloaded, _ = load_run(str(tmp_path / "out"))
    assert (logits(reloaded, x) - trained).abs().max() <= 1e-5
    if method == "pissa":  # converted to a plain LoRA of rank 2r on the original base weights
        saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
        assert saved["r"] == 2 * METHODS["pissa"]["lora_rank"] and saved["init_lora_weights"] is True
    if method in MERGEABLE:
        merged = reloaded.merge_and_unload()
        assert (logits(merged, x) - trained).abs().max() <= 1e-4


def test_prefix_tuning_on_mla_is_a_clear_error(tiny_ds, parity_file, tmp_path):
    from r1tune.errors import UserError

    with pytest.raises(UserError, match="prefix_tuning.*MLA"):
        run_method(tiny_ds, parity_file, tmp_path / "out", **METHODS["prefix_tuning"])
    assert not (tmp_path / "out").exists()
