"""examples/dpo.yaml, shortened (30 of its 60 steps, 40 generated answers; ~30 s): held-out preference
accuracy rises from chance-or-worse to >= 0.9 and the generated answers move toward the chosen style."""

import json

import pytest

from r1tune.config import load_config
from r1tune.train.stages.registry import run_stage
from tests.conftest import ROOT


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def test_dpo_example_learns_the_preference_and_the_style(tmp_path):
    keys = [f"model_name_or_path={tmp_path / 'tiny'}", f"output_dir={tmp_path / 'out'}", "report_to=none",
            "max_steps=30", "eval_steps=30", "save_steps=30", "eval_generate_samples=40", "plot_loss=false"]
    run_stage(load_config(ROOT / "examples" / "dpo.yaml", keys))
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    before, after = results["before"], results["after"]
    assert before["choice_accuracy"] <= 0.6 and after["choice_accuracy"] >= 0.9
    assert before["rewards/accuracies"] == 0.0 and after["rewards/accuracies"] >= 0.9  # ties before training
    assert after["rewards/margins"] > 1.0
    assert after["generated/closer_to_chosen"] >= before["generated/closer_to_chosen"] + 0.5
    assert after["generated/rouge_l_chosen"] >= before["generated/rouge_l_chosen"] + 0.2
    log = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    eval_rows = [r for r in log if r.get("split") == "eval"]
    assert eval_rows and {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(eval_rows[-1])
