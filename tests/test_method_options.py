"""Method options beyond the per-method matrix: expert selection, progressive unfreezing, continuing
adapters, LoRA+ learning rates, optimizers in a run, AdaLoRA's rank report, conflicting options."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from r1tune.config import validate_config
from r1tune.errors import UserError
from r1tune.models.run_loading import load_run
from r1tune.train.logs import read_log
from r1tune.train.stages.sft import run_sft
from tests.conftest import make_cfg
from tests.test_methods import logits, run_method


def load_model_plain(model_dir):
    from r1tune.models.loading import load_model

    return load_model(str(model_dir))


def base_weights(model_dir) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


# --- MoE expert-selective tuning ---------------------------------------------------------------
def test_full_tuning_of_chosen_experts_changes_only_them(tiny_ds, parity_file, tmp_path, capsys):
    out = tmp_path / "out"
    result, _ = run_method(tiny_ds, parity_file, out, finetuning_type="full", expert_ids="1:2,5", learning_rate=1e-3)
    before, after = base_weights(tiny_ds), load_file(str(out / "model.safetensors"))
    for key in ("gate_proj", "up_proj", "down_proj"):  # saved per expert; fused in memory
        names = [f"model.layers.1.mlp.experts.{e}.{key}.weight" for e in range(8)]
        changed = [not torch.equal(after[n], before[n]) for n in names]
        assert changed == [e in (2, 5) for e in range(8)], (key, changed)
    for name in ("model.layers.1.mlp.gate.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.1.self_attn.q_a_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight"):
        assert torch.equal(after[name], before[name]), name
    experts = result.model.model.layers[1].mlp.experts  # only the chosen experts' share counts as trainable
    assert f"trainable params: {(experts.gate_up_proj.numel() + experts.down_proj.numel()) * 2 // 8:,} ||" \
        in capsys.readouterr().out
    report = json.loads((out / "expert_load.json").read_text())
    assert report["selection"] == {"1": [2, 5]} and report["before"][0]["layer"] == 1 and report["after"]


def test_top_k_experts_with_lora_and_trained_router_reload(tiny_ds, parity_file, tmp_path):
    out = tmp_path / "out"
    result, scores = run_method(tiny_ds, parity_file, out, lora_rank=4, learning_rate=3e-3, expert_top_k=2,
                                train_router=True)
    report = json.loads((out / "expert_load.json").read_text())
    busiest_two = [e for e, _ in report["before"][0]["top"][:2]]  # measured on the same routing batches
    assert sorted(report["selection"]["1"]) == sorted(busiest_two)
    x = torch.randint(5, 500, (2, 12))
    reloaded, _ = load_run(str(out))
    assert (logits(reloaded, x) - logits(result.model, x)).abs().max() <= 1e-5
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert any(".mlp.gate." in k for k in saved), "the trained router copy is saved with the adapter"


def test_expert_selection_on_a_dense_model_is_a_clear_error(tiny_qwen, parity_file, tmp_path):
    with pytest.raises(UserError, match="mixture-of-experts"):
        run_method(tiny_qwen, parity_file, tmp_path / "out", expert_top_k=2)
    assert not (tmp_path / "out").exists()


# --- progressive unfreezing --------------------------------------------------------------------
SCHEDULE = [{"step": 0, "layers": 1, "modules": "mlp"}, {"step": 3, "layers": 2, "modules": "self_attn"}]


def test_unfreeze_schedule_trains_each_stage_from_its_step(tiny_qwen, parity_file, tmp_path):
    out = tmp_path / "out"
    run_method(tiny_qwen, parity_file, out, finetuning_type="freeze", unfreeze_schedule=SCHEDULE, learning_rate=1e-3)
    events = [r for r in read_log(out) if r.get("split") == "unfreeze"]
    assert [(e["step"], e["unfrozen"]) for e in events] == [
        (0, "mlp of top 1 layer"), (3, "self_attn of top 2 layers")]
    before, after = base_weights(tiny_qwen), load_file(str(out / "model.safetensors"))
    def moved(name):
        return not torch.equal(before[name], after[name])
    assert moved("model.layers.1.mlp.up_proj.weight") and not moved("model.layers.0.mlp.up_proj.weight")
    assert moved("model.layers.0.self_attn.q_proj.weight") and moved("model.layers.1.self_attn.q_proj.weight")
    assert not moved("model.embed_tokens.weight")


def test_unfreeze_schedule_resumes_with_matching_optimizer_groups(tiny_qwen, parity_file, tmp_path):
    out = tmp_path / "out"
    keys = dict(finetuning_type="freeze", unfreeze_schedule=SCHEDULE, learning_rate=1e-3, max_steps=8, save_steps=4)
    run_sft(make_cfg(tiny_qwen, parity_file, out, bf16=False, **keys))
    whole = load_file(str(out / "model.safetensors"))
    run_sft(make_cfg(tiny_qwen, parity_file, out, bf16=False, resume_from_checkpoint=str(out / "checkpoint-4"), **keys))
    resumed = load_file(str(out / "model.safetensors"))
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) < 1e-5


def test_unfreeze_schedule_errors():
    base = dict(model_name_or_path="m", dataset="d", output_dir="o", finetuning_type="freeze")
    with pytest.raises(UserError, match="entry 2 needs exactly one of 'step' or 'epoch'"):
        validate_config({**base, "unfreeze_schedule": [{"step": 0}, {"layers": 2}]})
    with pytest.raises(UserError, match="either 'freeze_trainable_layers' or 'unfreeze_schedule'"):
        validate_config({**base, "unfreeze_schedule": [{"step": 0}], "freeze_trainable_layers": 2})
    with pytest.raises(UserError, match="'unfreeze_schedule' applies to finetuning_type freeze / lora"):
        validate_config({**base, "finetuning_type": "full", "unfreeze_schedule": [{"step": 0}]})


def test_freeze_trainable_modules_limits_the_top_layers(tiny_qwen, parity_file, tmp_path):
    out = tmp_path / "out"
    run_method(tiny_qwen, parity_file, out, finetuning_type="freeze", freeze_trainable_layers=1,
               freeze_trainable_modules="self_attn", freeze_extra_modules="norm", learning_rate=1e-3)
    before, after = base_weights(tiny_qwen), load_file(str(out / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.1.self_attn.") or k == "model.norm.weight" for k in changed)
    assert "model.norm.weight" in changed


# --- continuing and stacking adapters ----------------------------------------------------------
def test_continue_an_adapter_and_stack_a_new_one(tiny_qwen, parity_file, tmp_path):
    first = tmp_path / "first"
    run_method(tiny_qwen, parity_file, first, lora_rank=4, learning_rate=3e-3)
    after_first = json.loads((first / "eval_results.json").read_text())["after"]["eval_loss"]
    x = torch.randint(5, 500, (2, 12))
    for name, extra in (("continued", {}), ("stacked", {"create_new_adapter": True, "lora_rank": 2})):
        out = tmp_path / name
        result, scores = run_method(tiny_qwen, parity_file, out, learning_rate=3e-3, adapter_name_or_path=str(first),
                                    **extra)
        assert abs(scores["before"]["eval_loss"] - after_first) < 1e-4, name  # starts where the first run ended
        assert scores["after"]["eval_loss"] < scores["before"]["eval_loss"]
        reloaded, _ = load_run(str(out))
        assert (logits(reloaded, x) - logits(result.model, x)).abs().max() <= 1e-5, name
    rank = json.loads((tmp_path / "stacked" / "adapter_config.json").read_text())["r"]
    assert rank == 2


def test_adapter_folder_must_exist(tiny_qwen, parity_file, tmp_path):
    with pytest.raises(UserError, match="'adapter_name_or_path'.*not a LoRA adapter folder"):
        run_method(tiny_qwen, parity_file, tmp_path / "out", adapter_name_or_path=str(tmp_path / "nope"))


# --- LoRA+, optimizers, AdaLoRA report, regularisation in a run -------------------------------
def test_loraplus_keeps_its_ratio_through_the_schedule(tiny_qwen, parity_file, tmp_path):
    from r1tune.models.loading import load_model
    from r1tune.models.methods import attach_method
    from r1tune.train.engine import Engine
    from r1tune.train.stage_loss import CausalLMLoss

    from r1tune.data.encode import Example

    cfg = make_cfg(tiny_qwen, parity_file, tmp_path / "o", loraplus_lr_ratio=8.0, learning_rate=1e-3,
                   warmup_steps=4, bf16=False)
    model = attach_method(load_model(str(tiny_qwen)), cfg)
    trainer = Engine(model, cfg, CausalLMLoss(model, 0, None), [Example([5, 6, 7], [-100, 6, 7])], [], tmp_path / "o")
    names = {id(p): n for n, p in model.named_parameters()}
    for step in (0, 3):
        trainer._apply_update(step)
        lrs = {"lora_B" in names[id(g["params"][0])]: g["lr"] for g in trainer.optimizer.param_groups}
        assert lrs[True] == pytest.approx(8.0 * lrs[False]) and 0 < lrs[False] <= 1e-3


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "lion_32bit", "adamw_8bit", "adafactor"])
def test_each_optimizer_trains_a_run(optim, tiny_qwen, parity_file, tmp_path):
    lr = 1e-3 if optim == "lion_32bit" else 3e-3
    _, scores = run_method(tiny_qwen, parity_file, tmp_path / "out", optim=optim, learning_rate=lr, lora_rank=4)
    assert scores["after"]["eval_loss"] < scores["before"]["eval_loss"]


def test_adalora_writes_its_rank_allocation(tiny_ds, parity_file, tmp_path):
    out = tmp_path / "out"
    run_method(tiny_ds, parity_file, out, finetuning_type="adalora", adalora_init_r=6, adalora_target_r=3,
               adalora_tinit=1, adalora_tfinal=2, learning_rate=3e-3)
    report = json.loads((out / "adalora_ranks.json").read_text())
    ranks = list(report["ranks"].values())
    assert ranks and max(ranks) <= 6 and min(ranks) < 6  # pruned below the initial rank
    assert abs(report["mean_rank"] - 3) <= 1
    assert (out / "adalora_ranks.png").stat().st_size > 2000


def test_regularisation_and_neftune_run(tiny_ds, parity_file, tmp_path):
    _, scores = run_method(tiny_ds, parity_file, tmp_path / "out", embedding_dropout=0.1, attention_dropout=0.1,
                           ffn_dropout=0.1, label_smoothing_factor=0.1, neftune_noise_alpha=5.0,
                           learning_rate=3e-3, lora_rank=4)
    assert scores["after"]["eval_loss"] < scores["before"]["eval_loss"]


# --- conflicting options ------------------------------------------------------------------------
BASE = dict(model_name_or_path="m", dataset="d", output_dir="o")


@pytest.mark.parametrize("keys, message", [
    ({"finetuning_type": "full", "quantization_bit": 4}, "'quantization_bit' applies to finetuning_type lora"),
    ({"pissa_init": True, "quantization_bit": 4}, "'pissa_init' rewrites the base weights"),
    ({"use_dora": True, "lora_experts": True}, "no DoRA, PiSSA or AdaLoRA for fused MoE experts"),
    ({"expert_ids": "1", "expert_top_k": 2}, "choose experts one way"),
    ({"finetuning_type": "bottleneck", "expert_top_k": 2}, "'expert_top_k' applies to finetuning_type full / lora"),
    ({"train_router": True}, "'train_router' belongs to expert-selective tuning"),
    ({"finetuning_type": "prompt_tuning", "packing": True}, "turn packing off"),
    ({"finetuning_type": "adalora", "add_tokens": "x"}, "added tokens"),
    ({"create_new_adapter": True}, "needs 'adapter_name_or_path'"),
    ({"optim": "adamw_8bt"}, "did you mean 'adamw_8bit'"),
])
def test_conflicting_options_are_config_errors(keys, message):
    with pytest.raises(UserError, match=message):
        validate_config({**BASE, **keys})


def test_other_methods_hyperparameter_is_only_a_notice(capsys):
    for key, value in (("lora_rank", 16), ("freeze_trainable_layers", 2), ("num_virtual_tokens", 8)):
        validate_config({**BASE, "finetuning_type": "full", key: value}, source="run.yaml")
        assert f"note: run.yaml: '{key}' applies to finetuning_type" in capsys.readouterr().err


def test_cli_conflict_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_name_or_path: m\ndataset: d\noutput_dir: o\nfinetuning_type: full\nquantization_bit: 4\n")
    proc = subprocess.run([sys.executable, "-m", "r1tune", "train", str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 2 and "quantization_bit" in proc.stderr and "Traceback" not in proc.stderr


# --- QLoRA, prompt init, additional targets -----------------------------------------------------
def test_quantization_without_bitsandbytes_is_one_sentence(monkeypatch):
    from r1tune.models.quantize import quantization_config

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError, match="'quantization_bit' needs bitsandbytes.*pip install bitsandbytes"):
        quantization_config(4)


def test_fp4_without_double_quantization_quantizes_the_linears(tiny_ds, parity_file, tmp_path):
    from bitsandbytes.nn import Linear4bit

    result, scores = run_method(tiny_ds, parity_file, tmp_path / "out", quantization_bit=4, quantization_type="fp4",
                                double_quantization=False, lora_rank=4, learning_rate=3e-3)
    from r1tune.models.methods import count_parameters

    layers = [m for m in result.model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(m.weight.quant_type == "fp4" and not m.weight.quant_state.nested for m in layers)
    trainable, total = count_parameters(result.model)  # 4-bit weights count unpacked: base + adapter
    assert total == sum(p.numel() for p in load_model_plain(tiny_ds).parameters()) + trainable
    assert scores["after"]["eval_loss"] < scores["before"]["eval_loss"]


def test_prompt_tuning_starts_from_the_init_text(tiny_qwen, parity_file, tmp_path):
    from transformers import AutoTokenizer

    text = "Answer with care"
    result, _ = run_method(tiny_qwen, parity_file, tmp_path / "out", finetuning_type="prompt_tuning",
                           num_virtual_tokens=3, prompt_tuning_init="text", prompt_tuning_init_text=text,
                           learning_rate=1e-9, max_steps=1)
    ids = AutoTokenizer.from_pretrained(tiny_qwen)(text, add_special_tokens=False)["input_ids"][:3]
    start = result.model.get_input_embeddings().weight[ids]
    virtual = result.model.prompt_encoder["default"].embedding.weight
    assert torch.allclose(virtual, start, atol=1e-6)


def test_additional_target_trains_and_saves_the_module(tiny_qwen, parity_file, tmp_path):
    out = tmp_path / "out"
    result, _ = run_method(tiny_qwen, parity_file, out, additional_target="norm", lora_rank=4, learning_rate=3e-3)
    saved = load_file(str(out / "adapter_model.safetensors"))
    norm = [k for k in saved if k.endswith("model.norm.weight")]
    assert norm and not torch.equal(saved[norm[0]], base_weights(tiny_qwen)["model.norm.weight"])
    x = torch.randint(5, 500, (2, 12))
    reloaded, _ = load_run(str(out))
    assert (logits(reloaded, x) - logits(result.model, x)).abs().max() <= 1e-5


def test_unfreeze_schedule_with_lora_unfreezes_adapters(tiny_ds, parity_file, tmp_path):
    out = tmp_path / "out"
    schedule = [{"step": 0, "layers": 1}, {"step": 50, "layers": "all"}]  # the second never comes
    run_method(tiny_ds, parity_file, out, unfreeze_schedule=schedule, lora_rank=4, learning_rate=3e-3)
    saved = load_file(str(out / "adapter_model.safetensors"))
    b = {k: v for k, v in saved.items() if "lora_B" in k}
    assert all(v.abs().max() == 0 for k, v in b.items() if ".layers.0." in k)  # LoRA B starts at zero
    assert all(v.abs().max() > 0 for k, v in b.items() if ".layers.1." in k)
