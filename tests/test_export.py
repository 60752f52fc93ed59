"""`r1tune export`: merged folders reload with plain transformers to the unmerged logits; model card;
sharding; methods that cannot merge are clear errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from r1tune.config import validate_config
from r1tune.errors import UserError
from r1tune.export.merge import logits_of, probe_batch
from r1tune.export.run import run_export
from r1tune.models.run_loading import load_run
from tests.test_methods import run_method


@pytest.mark.parametrize("arch, keys", [("deepseek_v3", {"lora_rank": 4}), ("qwen2", {"use_dora": True}),
                                        ("qwen2", {"finetuning_type": "full", "learning_rate": 1e-3}),
                                        ("deepseek_v3", {"quantization_bit": 4, "lora_rank": 4})])
def test_merged_folder_reloads_to_the_unmerged_logits(arch, keys, tiny_ds, tiny_qwen, parity_file, tmp_path):
    model_dir = tiny_ds if arch == "deepseek_v3" else tiny_qwen
    out, merged = tmp_path / "out", tmp_path / "merged"
    _, scores = run_method(model_dir, parity_file, out, **{"learning_rate": 3e-3, **keys})
    cfg = validate_config({"model_name_or_path": str(model_dir), "dataset": str(parity_file), "output_dir": str(out),
                           "export_dir": str(merged), "export_size": 0.0002, "model_license": "mit"})
    assert run_export(cfg) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)  # nothing from r1tune
    unmerged, _ = load_run(str(out), quantized=False)
    batch = probe_batch(plain.config.vocab_size, seed=3)
    assert (logits_of(plain, batch) - logits_of(unmerged, batch)).abs().max() <= 1e-4
    assert len(list(merged.glob("*.safetensors"))) > 1  # sharded at 0.2 MB
    assert AutoTokenizer.from_pretrained(merged).chat_template and (merged / "generation_config.json").is_file()
    card = (merged / "README.md").read_text()
    assert "license: mit" in card and str(model_dir) in card and "| learning_rate |" in card
    assert f"{scores['after']['eval_loss']:.4f}" in card
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("method", ["bottleneck", "prompt_tuning"])
def test_methods_that_cannot_merge_are_clear_errors(method, tiny_qwen, parity_file, tmp_path):
    run_method(tiny_qwen, parity_file, tmp_path / "out", finetuning_type=method, learning_rate=1e-3)
    cfg = validate_config({"model_name_or_path": str(tiny_qwen), "dataset": str(parity_file),
                           "output_dir": str(tmp_path / "out")})
    with pytest.raises(UserError, match="cannot be merged"):
        run_export(cfg)
    assert not (tmp_path / "out" / "merged").exists()


def test_legacy_bin_format_is_refused():
    with pytest.raises(UserError, match="safetensors only"):
        validate_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "export_legacy_format": True})


def test_onnx_and_gguf_copies_of_the_merged_model(tiny_qwen, parity_file, tmp_path, capsys):
    from r1tune.export.gguf_export import read_gguf_summary

    out, merged = tmp_path / "out", tmp_path / "merged"
    run_method(tiny_qwen, parity_file, out, lora_rank=4, learning_rate=3e-3)
    cfg = validate_config({"model_name_or_path": str(tiny_qwen), "dataset": str(parity_file), "output_dir": str(out),
                           "export_dir": str(merged), "export_onnx": True, "export_gguf": True, "export_int8": True})
    assert run_export(cfg) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert re.search(r"int8: .* perplexity on 8 held-out samples [\d.]+ vs [\d.]+", printed), printed  # val_size 8
    from r1tune.export.int8 import load_int8

    assert (merged / "int8" / "model.safetensors").is_file() and load_int8(merged / "int8") is not None
    assert (merged / "onnx" / "model.onnx").is_file()
    summary = read_gguf_summary(merged / "model.gguf")
    assert summary["architecture"] == "qwen2" and summary["has_chat_template"]
    assert "PARAMETER stop" in (merged / "Modelfile").read_text()
