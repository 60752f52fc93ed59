"""The README quickstart, end to end: the tiny DeepSeek-V3 visibly learns the reasoning task, and `r1tune eval` shows it beating the base (~100 s)."""

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
    # `r1tune eval` on the same output: the tuned model beats the base on the same prompts, and gates work
    from r1tune.evaluation.run import run_eval

    gates = ["accuracy >= 0.7", "ppl_drop >= 0.9", "accuracy_gain >= 0.5", "rouge_l_gain > 0.5"]  # one-word answers: no 4-grams for BLEU-4
    assert run_eval(load_config(ROOT / "examples" / "quickstart.yaml", [
        f"model_name_or_path={tmp_path / 'tiny'}", f"output_dir={tmp_path / 'out'}", "eval_max_samples=40",
        f"eval_thresholds={json.dumps(gates)}"])) == 0
    report = json.loads((tmp_path / "out" / "eval" / "eval_report.json").read_text())
    assert report["passed"] and report["tuned"]["accuracy"] > report["base"]["accuracy"]
    assert report["tuned"]["perplexity"] < report["base"]["perplexity"]
    assert (tmp_path / "out" / "eval" / "eval_report.png").stat().st_size > 2000
    lines = (tmp_path / "out" / "eval" / "predictions_tuned.jsonl").read_text().splitlines()
    assert len(lines) == 40 and {"question", "reference", "output", "answer", "reasoning_tokens"} <= set(json.loads(lines[0]))
