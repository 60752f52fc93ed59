"""The GRPO example learns (issue 18, point 7): a short version of examples/grpo_sft.yaml then
examples/grpo.yaml raises held-out greedy accuracy by at least 20 points. About 2-3 minutes on 2 cores,
so marked slow: `pytest -m slow tests/test_grpo_learns.py`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _train(config: str, *overrides: str) -> None:
    done = subprocess.run([sys.executable, "-m", "r1tune", "train", str(ROOT / config), *overrides], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.slow
def test_grpo_example_raises_held_out_accuracy(tmp_path):
    sft, grpo = tmp_path / "sft", tmp_path / "grpo"
    _train("examples/grpo_sft.yaml", f"output_dir={sft}", f"data_cache_dir={tmp_path / 'cache'}")
    _train("examples/grpo.yaml", f"model_name_or_path={sft}", f"output_dir={grpo}", "max_steps=50",
           "eval_steps=50", "save_steps=50", f"data_cache_dir={tmp_path / 'cache'}")
    results = json.loads((grpo / "eval_results.json").read_text())
    before = results["before"]["rewards/accuracy/mean"]
    after = results["after"]["rewards/accuracy/mean"]
    print(f"held-out accuracy {before:.2f} -> {after:.2f}")
    assert after >= before + 0.20, (before, after)
    log = [json.loads(line) for line in (grpo / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    rewards = [r["reward"] for r in log if r.get("split", "train") == "train" and "reward" in r]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2, rewards  # the sampled reward rises too
