"""The README quickstart, end to end (~100 s): the tiny DeepSeek-V3 visibly learns the reasoning task with
no false alarm, the README's chat transcript reproduces word for word, its figures within a CPU kind's
rounding, and `r1tune eval` shows the tuned model beating the base."""

import json
import re

import pytest

from r1tune.cli import main
from r1tune.config import load_config
from r1tune.train.stages.sft import run_sft
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_transcript(command_prefix: str) -> tuple[str, str]:
    """(command, expected output) of the README's ```text block whose first line starts with command_prefix."""
    for block in re.findall(r"```text\n(.*?)```", README, flags=re.S):
        first, _, rest = block.partition("\n")
        if first.startswith(command_prefix):
            return first, rest
    raise AssertionError(f"README has no transcript starting with {command_prefix!r}")


def readme_figure(metric: str) -> tuple[float, float]:
    """(before, after) of a row of the README's quickstart table."""
    row = re.search(rf"^\| {re.escape(metric)} \| ([^|]+) \| ([^|]+) \|$", README, flags=re.M)
    assert row, f"README's quickstart table has no row {metric!r}"
    return tuple(float(cell.strip().rstrip(" %").replace(",", "")) for cell in row.groups())


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quickstart")
    keys = [f"model_name_or_path={tmp / 'tiny'}", f"output_dir={tmp / 'out'}", "report_to=none"]
    run_sft(load_config(ROOT / "examples" / "quickstart.yaml", keys))
    return tmp


def test_quickstart_learns_without_false_alarms_as_the_readme_says(quickstart):
    results = json.loads((quickstart / "out" / "eval_results.json").read_text())
    before, after = results["before"], results["after"]
    assert before["exact_match"] <= 0.1 and after["exact_match"] >= 0.85
    assert after["eval_loss"] < 0.05 * before["eval_loss"]
    assert after["exact_match"] * 100 == pytest.approx(readme_figure("exact-match accuracy of the generated final answer")[1], abs=3)
    assert after["eval_loss"] == pytest.approx(readme_figure("eval loss")[1], rel=0.25)
    log = [json.loads(line) for line in (quickstart / "out" / "trainer_log.jsonl").read_text().splitlines()]
    assert not [r for r in log if r.get("split") == "alarm"], "a healthy run raised a gradient alarm"


def test_readme_chat_transcript_reproduces(quickstart, capsys):
    command, expected = readme_transcript("$ r1tune chat outputs/quickstart --prompt")
    prompt = re.search(r'--prompt "([^"]+)"', command).group(1)
    assert main(["chat", str(quickstart / "out"), "--prompt", prompt]) == 0
    assert capsys.readouterr().out == expected


def test_eval_beats_the_base_and_gates_work(quickstart):
    from r1tune.evaluation.run import run_eval

    gates = ["accuracy >= 0.7", "ppl_drop >= 0.9", "accuracy_gain >= 0.5", "rouge_l_gain > 0.5"]
    assert run_eval(load_config(ROOT / "examples" / "quickstart.yaml", [
        f"model_name_or_path={quickstart / 'tiny'}", f"output_dir={quickstart / 'out'}", "eval_max_samples=40",
        f"eval_thresholds={json.dumps(gates)}"])) == 0
    report = json.loads((quickstart / "out" / "eval" / "eval_report.json").read_text())
    assert report["passed"] and report["tuned"]["accuracy"] > report["base"]["accuracy"]
    assert report["tuned"]["perplexity"] < report["base"]["perplexity"]
    assert report["tuned"]["bleu4"] is None  # one-word answers: BLEU-4 does not apply, and says so
    assert (quickstart / "out" / "eval" / "eval_report.png").stat().st_size > 2000
    lines = (quickstart / "out" / "eval" / "predictions_tuned.jsonl").read_text().splitlines()
    assert len(lines) == 40 and {"question", "reference", "output", "answer", "reasoning_tokens"} <= set(json.loads(lines[0]))
