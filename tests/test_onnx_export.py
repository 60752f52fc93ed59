"""ONNX export of the tiny Qwen2 and DeepSeek-V3 models, validated with onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from r1tune.errors import UserError  # noqa: E402
from r1tune.export import onnx_export  # noqa: E402
from r1tune.export.onnx_export import LogitsOnly, export_onnx, run_onnx, sample_batch  # noqa: E402


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def qwen(tiny_qwen):
    return _load(tiny_qwen)


@pytest.fixture(scope="module")
def ds(tiny_ds):
    return _load(tiny_ds)


@pytest.fixture(scope="module")
def qwen_export(qwen, tmp_path_factory):
    return export_onnx(qwen, tmp_path_factory.mktemp("onnx") / "qwen")


@pytest.fixture(scope="module")
def ds_export(ds, tmp_path_factory):
    return export_onnx(ds, tmp_path_factory.mktemp("onnx") / "ds")


def _check_other_shapes(model, path):
    """onnxruntime runs at batch sizes and lengths unlike the trace (2 x 16) and matches PyTorch."""
    for batch, seq in ((1, 7), (4, 23)):
        ids, mask = sample_batch(model.config.vocab_size, batch, seq, seed=batch)
        got = run_onnx(path, ids.numpy(), mask.numpy())
        assert got.shape == (batch, seq, model.config.vocab_size)
        with torch.no_grad():
            want = LogitsOnly(model)(ids, mask).numpy()
        assert np.abs(got - want)[mask.numpy().astype(bool)].max() <= 1e-4


@pytest.mark.parametrize("name", ["qwen", "ds"])
def test_export_matches_pytorch(name, request):
    model, report = request.getfixturevalue(name), request.getfixturevalue(f"{name}_export")
    assert report.path.name == "model.onnx" and report.path.is_file()
    assert report.size_bytes >= report.path.stat().st_size > 0
    assert report.exporter == "dynamo"
    assert 0 <= report.max_abs_diff <= 1e-4
    assert report.seconds > 0
    _check_other_shapes(model, report.path)


def test_moe_experts_setting_is_restored(ds, ds_export):
    assert ds.config._experts_implementation == "grouped_mm"


def test_graph_io_names(qwen_export):
    import onnx

    graph = onnx.load(str(qwen_export.path), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["logits"]


def test_torchscript_fallback_and_atomic_replace(qwen, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("dynamo says no")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    report = export_onnx(qwen, out, seq_len=12)
    assert report.exporter == "torchscript"
    assert report.max_abs_diff <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]  # no temp folders left behind
    _check_other_shapes(qwen, report.path)


def test_both_exporters_failing_is_a_user_error(qwen, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("nope")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    monkeypatch.setattr(onnx_export, "_export_torchscript", broken)
    with pytest.raises(UserError, match="dynamo exporter.*TorchScript exporter"):
        export_onnx(qwen, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_half_precision_model_is_refused(tiny_qwen, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.bfloat16)
    with pytest.raises(UserError, match="fp32"):
        export_onnx(model, tmp_path / "out")
