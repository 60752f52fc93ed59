"""Gradient checkpointing turns itself on only when the activation estimate exceeds the budget;
freed heap memory goes back to the OS; oneDNN's primitive cache is capped."""

import sys
from types import SimpleNamespace

import psutil
import pytest
import torch

from r1tune.train.memory import activation_bytes, checkpointing_decision, release_free_memory

CONFIG = SimpleNamespace(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1408)


def test_estimate_grows_with_batch_and_quadratically_in_attention():
    small, double = activation_bytes(CONFIG, 8, 512), activation_bytes(CONFIG, 16, 512)
    assert double == 2 * small
    assert activation_bytes(CONFIG, 8, 2048) > 2.5 * activation_bytes(CONFIG, 8, 1024)  # attention is quadratic


def test_decision_follows_budget_and_explicit_setting():
    on, why = checkpointing_decision(None, CONFIG, 8, 1024, budget_gb=0.5)
    assert on and "auto" in why and "0.5 GB budget" in why
    assert checkpointing_decision(None, CONFIG, 8, 1024, budget_gb=64)[0] is False
    assert checkpointing_decision(False, CONFIG, 8, 1024, budget_gb=0.001) == (False, "set in the config")


def test_auto_checkpointing_in_a_run(tiny_qwen, parity_file, tmp_path):
    from r1tune.train.logs import read_log
    from r1tune.train.stages.sft import run_sft
    from tests.conftest import make_cfg

    result = run_sft(make_cfg(tiny_qwen, parity_file, tmp_path / "out", memory_budget_gb=1e-6, max_steps=6,
                              learning_rate=1e-2))
    losses = [r["loss"] for r in read_log(tmp_path / "out") if r["split"] == "train"]
    assert result.global_step == 6 and losses[-1] < losses[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_release_free_memory_gives_heap_pages_back():
    proc = psutil.Process()
    # 64 KB blocks come from the heap (below glibc's mmap threshold); the last one pins the heap top,
    # so free() alone cannot shrink it and only a trim returns the pages.
    blocks = [torch.ones(16384) for _ in range(3000)]
    keep = blocks.pop()
    del blocks
    before = proc.memory_info().rss
    assert release_free_memory()
    assert before - proc.memory_info().rss > 100 * 2**20
    assert keep.sum().item() == 16384


RETAINED = """
import ctypes, os, sys, psutil, torch
from r1tune.train.memory import limit_onednn_cache
limit_onednn_cache()  # after importing torch, before the first bf16 matmul, as the CLI does
layer = torch.nn.Linear(448, 1232)
for rows in range(256, 1024, 8):  # 96 matmul shapes, as varying sequence widths give
    x = torch.randn(rows, 448, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(psutil.Process().memory_info().rss)
"""


def _retained_rss(env: dict) -> int:
    import os
    import subprocess

    out = subprocess.run([sys.executable, "-c", RETAINED], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.split()[-1])


def _native_bf16() -> bool:
    from r1tune.envinfo import cpu_bf16

    return cpu_bf16()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures glibc RSS")
@pytest.mark.skipif(not _native_bf16(), reason="no AVX-512 BF16/AMX: bf16 matmuls do not go through oneDNN's cache")
def test_capped_onednn_cache_keeps_less_memory_after_many_shapes(monkeypatch):
    from r1tune.train.memory import ONEDNN_CACHE_ENV

    monkeypatch.delenv(ONEDNN_CACHE_ENV, raising=False)
    capped = _retained_rss({})
    default = _retained_rss({ONEDNN_CACHE_ENV: "1024"})  # a value the user set wins: oneDNN's default
    assert default - capped > 40 * 2**20


def test_onednn_cache_setting_of_the_user_wins(monkeypatch):
    import os

    from r1tune.cli import main
    from r1tune.train.memory import ONEDNN_CACHE_ENV, ONEDNN_CACHE_SIZE

    monkeypatch.delenv(ONEDNN_CACHE_ENV, raising=False)
    assert main(["env"]) == 0
    assert os.environ[ONEDNN_CACHE_ENV] == str(ONEDNN_CACHE_SIZE)
    monkeypatch.setenv(ONEDNN_CACHE_ENV, "512")
    assert main(["env"]) == 0
    assert os.environ[ONEDNN_CACHE_ENV] == "512"
