"""Shared fixtures: tiny models built once per session, small data files, config helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1tune.config import validate_config
from r1tune.models.tiny import build_tiny

ROOT = Path(__file__).resolve().parents[1]
PARITY = ROOT / "examples" / "data" / "parity.jsonl"


@pytest.fixture(scope="session", autouse=True)
def _private_data_cache(tmp_path_factory):
    """Tests (and the CLI subprocesses they start) cache tokenized data in a temp folder."""
    import os

    os.environ["R1TUNE_CACHE"] = str(tmp_path_factory.mktemp("r1tune-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny runs: as fast on a quiet machine, and several times faster
    when other processes share the cores (two threads spin-waiting on each other: 4 min vs 30 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_ds(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("models") / "ds", "deepseek_v3", hidden_size=64, num_layers=2)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("models") / "qwen", "qwen2", hidden_size=64, num_layers=2)


@pytest.fixture(scope="session")
def tokenizer(tiny_ds):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_ds)


@pytest.fixture()
def parity_file(tmp_path) -> Path:
    """The first 64 quickstart records."""
    lines = PARITY.read_text(encoding="utf-8").splitlines()[:64]
    path = tmp_path / "parity.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def make_cfg(model: Path, data: Path, out: Path, **overrides):
    raw = dict(model_name_or_path=str(model), dataset=str(data), output_dir=str(out),
               per_device_train_batch_size=8, learning_rate=3e-3, max_steps=8, logging_steps=1,
               save_steps=1000, cutoff_len=96, report_to="none", plot_loss=False, seed=7)
    raw.update(overrides)
    return validate_config(raw, source="test.yaml")
