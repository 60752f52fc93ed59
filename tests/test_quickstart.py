"""The README quickstart, end to end: the tiny DeepSeek-V3 visibly learns the reasoning task (~70 s)."""

import json

from r1tune.config import load_config
from r1tune.train.stages.sft import run_sft
from tests.conftest import ROOT


def test_quickstart_learns(tmp_path):
    cfg = load_config(ROOT / "examples" / "quickstart.yaml",
                      [f"model_name_or_path={tmp_path / 'tiny'}", f"output_dir={tmp_path / 'out'}", "report_to=none"])
    run_sft(cfg)
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    before, after = results["before"], results["after"]
    assert before["exact_match"] <= 0.1 and after["exact_match"] >= 0.7
    assert after["eval_loss"] < 0.3 * before["eval_loss"]
