"""Pinned losses: fixed tiny runs of each stage give, at every step, the losses recorded before a refactor
(within 1e-5). A change that moves code must leave these numbers alone; a change that means to alter them
re-records them (`python -m tests.test_pinned_losses`) and says why in its commit.

The runs are fp32. Recorded on an AMX CPU and again with oneDNN and ATen capped to AVX2 (as on a CPU
without AVX-512), the losses of every case differed by at most 1e-6 (2026-12-04), so one set serves
every CPU kind."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from r1tune.config import validate_config
from r1tune.train.stages.sft import run_sft

PINNED = Path(__file__).parent / "fixtures" / "pinned_losses.json"
TOLERANCE = 1e-5
COMMON = dict(per_device_train_batch_size=8, learning_rate=3e-3, max_steps=6, logging_steps=1, save_steps=1000,
              cutoff_len=96, report_to="none", plot_loss=False, seed=7, bf16=False, val_size=8, eval_steps=3,
              eval_generate_samples=0, data_cache=False)
CASES = {
    "sft-lora-deepseek_v3": ("deepseek_v3", "chat", dict(lora_rank=8, lora_dropout=0.0)),
    "sft-lora-qwen2-packed-accumulated": ("qwen2", "chat", dict(lora_rank=8, packing=True, gradient_accumulation_steps=2,
                                                                per_device_train_batch_size=4)),
    "sft-full-qwen2": ("qwen2", "chat", dict(finetuning_type="full", learning_rate=1e-3)),
    "pt-lora-qwen2": ("qwen2", "text", dict(stage="pt", lora_rank=8, cutoff_len=64)),
}


def data_file(kind: str, folder: Path) -> Path:
    from tests.conftest import PARITY

    lines = PARITY.read_text(encoding="utf-8").splitlines()[:72]
    if kind == "text":  # pretraining: the reasoning sentences as plain documents
        lines = [json.dumps({"text": json.loads(line)["messages"][1]["content"].split("</think>")[0]
                             .removeprefix("<think>\n")}, ensure_ascii=False) for line in lines]
    path = folder / f"{kind}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_case(name: str, models: dict[str, Path], folder: Path) -> dict[str, list[float]]:
    arch, kind, keys = CASES[name]
    out = folder / name
    cfg = validate_config(dict(model_name_or_path=str(models[arch]), dataset=str(data_file(kind, folder)),
                               output_dir=str(out), **{**COMMON, **keys}), source="pinned.yaml")
    run_sft(cfg)
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return {split: [r["loss"] for r in records if r.get("split") == split] for split in ("train", "eval")}


@pytest.fixture(scope="module")
def models(tiny_ds, tiny_qwen):
    return {"deepseek_v3": tiny_ds, "qwen2": tiny_qwen}


@pytest.mark.parametrize("name", list(CASES))
def test_losses_equal_the_pinned_ones(name, models, tmp_path):
    recorded = json.loads(PINNED.read_text(encoding="utf-8"))
    got = run_case(name, models, tmp_path)
    assert len(got["train"]) == COMMON["max_steps"] and len(got["eval"]) == 2
    for split in ("train", "eval"):
        assert got[split] == pytest.approx(recorded[name][split], abs=TOLERANCE), split


def record() -> None:
    """Re-record the losses (run from the repository root)."""
    import tempfile

    from r1tune.models.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["R1TUNE_CACHE"] = str(folder / "cache")
        models = {"deepseek_v3": build_tiny(folder / "ds", "deepseek_v3", hidden_size=64, num_layers=2),
                  "qwen2": build_tiny(folder / "qwen", "qwen2", hidden_size=64, num_layers=2)}
        pinned = {name: run_case(name, models, folder) for name in CASES}
    PINNED.write_text(json.dumps(pinned, indent=1) + "\n", encoding="utf-8")
    print(f"recorded {len(CASES)} runs in {PINNED}", file=sys.stderr)


if __name__ == "__main__":
    record()
