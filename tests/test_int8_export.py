"""Int8 dynamic quantization: reload, logits close to fp32, smaller file, perplexity, safetensors only."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from r1tune.export.int8 import QUANT_FILE, Int8DynamicLinear, load_int8, quantize_int8

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


@pytest.fixture(scope="module", params=["tiny_qwen", "tiny_ds"])
def exported(request, tmp_path_factory):
    model_dir = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp("int8") / f"{request.param}-int8"
    return model_dir, quantize_int8(model_dir, out)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_reload_logits_close(exported):
    from transformers import AutoModelForCausalLM

    model_dir, report = exported
    fp32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    int8 = load_int8(report.path)
    ids = torch.randint(0, fp32.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ref, got = _logits(fp32, ids), _logits(int8, ids)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < 0.05, f"max abs diff {(got - ref).abs().max().item():.4g}, relative {rel:.4g}"


def test_layers_quantized_head_and_embedding_fp32(exported):
    _, report = exported
    model = load_int8(report.path)
    meta = json.loads((report.path / QUANT_FILE).read_text())
    quantized = [m for m in model.modules() if isinstance(m, Int8DynamicLinear)]
    assert quantized and len(quantized) == len(meta["modules"])
    assert all(m.weight.dtype == torch.int8 for m in quantized)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.dtype == torch.float32
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert not any(isinstance(m, nn.Linear) for m in model.get_decoder().modules())


def test_smaller_and_perplexity(exported):
    _, report = exported
    assert report.size_bytes < report.fp32_size_bytes
    assert report.metric_name == "perplexity" and report.metric_data == "4 fixed sentences (no held-out data given)"
    assert 0.9 < report.metric / report.fp32_metric < 1.1
    assert report.tokens_per_s > 0 and report.fp32_tokens_per_s > 0


def test_safetensors_only(exported):
    _, report = exported
    files = [p for p in report.path.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]
    assert [p.name for p in files if p.name.endswith(".safetensors")] == ["model.safetensors"]
    assert not [p for p in report.path.parent.iterdir() if p.name.startswith(".")]  # temp folder gone


def test_int8_linear_matches_float():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(3, 5, 64)
    q = Int8DynamicLinear.from_linear(lin)
    ref = lin(x)
    assert q(x).shape == ref.shape
    assert ((q(x) - ref).abs().max() / ref.abs().max()).item() < 0.02
