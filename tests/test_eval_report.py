"""Metrics that do not apply to the data: the rules, and n/a with the reason in every report and gate."""

from __future__ import annotations

import json

import pytest

from r1tune.data.metrics import BLEU_SHORT, ONE_LABEL, ROUGE_EMPTY, NotApplicable, bleu4, not_applicable, rouge_l
from r1tune.evaluation.report import derived, judge, markdown, metric_rows, parse_thresholds, write_report
from r1tune.evaluation.run import print_summary, text_scores

PARITY_REFS = ["odd", "even", "奇数", "偶数"]  # the quickstart's answers: 1 or 2 metric tokens


def test_bleu4_is_na_exactly_when_identical_answers_cannot_score():
    assert not_applicable(PARITY_REFS) == {"bleu4": NotApplicable(BLEU_SHORT)}
    assert bleu4(PARITY_REFS, PARITY_REFS) == 0.0  # why: a perfect model scores 0
    assert not_applicable(["奇数是的"] + PARITY_REFS) == {}  # one reference of 4 tokens (CJK characters count one)
    assert bleu4(["奇数是的"] + PARITY_REFS, ["奇数是的"] + PARITY_REFS) == pytest.approx(1.0)
    assert "bleu4" in not_applicable(["The odd one"])  # 3 tokens
    assert not_applicable(["It is odd."]) == {"f1_macro": NotApplicable(ONE_LABEL)}  # "It is odd ." is 4 tokens


def test_rouge_l_on_empty_references_and_f1_macro_on_one_label():
    assert not_applicable(["", " "]) == {"bleu4": NotApplicable(BLEU_SHORT), "rouge_l": NotApplicable(ROUGE_EMPTY)}
    assert rouge_l(["", " "], ["", " "]) == 0.0
    assert not_applicable(["", ""])["f1_macro"] == NotApplicable(ONE_LABEL)
    assert "f1_macro" not in not_applicable(["odd", "even"])
    scores = text_scores(["odd", "odd", "even"], ["odd", "odd", "odd"])
    assert scores["f1_macro"] == NotApplicable(ONE_LABEL) and scores["bleu4"] == NotApplicable(BLEU_SHORT)
    assert scores["f1_micro"] == scores["accuracy"] == pytest.approx(2 / 3)  # still numbers
    assert str(scores["bleu4"]) == "n/a (references under 4 tokens)"


def _scores(accuracy: float, ppl: float) -> dict:
    return {"perplexity": ppl, "bleu4": NotApplicable(BLEU_SHORT), "rouge_l": accuracy, "accuracy": accuracy,
            "reasoning_tokens": 0.5}


def test_gains_of_na_metrics_are_na_and_a_gate_on_one_fails_with_the_reason():
    tuned, base = _scores(0.9, 1.5), _scores(0.1, 30.0)
    gains = derived(tuned, base)
    assert gains["bleu4_gain"] == NotApplicable(BLEU_SHORT)
    assert gains["accuracy_gain"] == pytest.approx(0.8) and gains["ppl_drop"] == pytest.approx(0.95)
    assert "reasoning_tokens_gain" not in gains and "perplexity_gain" not in gains  # not [0, 1] scores
    gates = judge(parse_thresholds(["bleu4 >= 0.0", "bleu4_gain > -1", "accuracy >= 0.8"]), tuned, gains)
    assert [(g.passed, g.actual, g.reason) for g in gates] == [(False, None, BLEU_SHORT), (False, None, BLEU_SHORT),
                                                               (True, 0.9, None)]
    na_ppl = derived({**tuned, "perplexity": NotApplicable("no answer tokens within cutoff_len")}, base)
    assert na_ppl["ppl_drop"] == NotApplicable("no answer tokens within cutoff_len")


def test_reports_show_na_with_the_reason_and_json_keeps_null(tmp_path, capsys):
    tuned, base = _scores(0.9, 1.5), _scores(0.1, 30.0)
    gains = derived(tuned, base)
    gates = judge(parse_thresholds(["bleu4 >= 0.4", "accuracy >= 0.8"]), tuned, gains)
    paths = write_report(tmp_path, tuned, base, gains, gates)
    report = json.loads(paths["json"].read_text())
    assert report["tuned"]["bleu4"] is None and report["base"]["bleu4"] is None
    assert report["derived"]["bleu4_gain"] is None and report["tuned"]["accuracy"] == 0.9
    assert report["not_applicable"] == {"tuned": {"bleu4": BLEU_SHORT}, "base": {"bleu4": BLEU_SHORT},
                                        "derived": {"bleu4_gain": BLEU_SHORT}}
    assert report["thresholds"][0] == {"gate": "bleu4 >= 0.4", "actual": None, "passed": False, "reason": BLEU_SHORT}
    assert report["thresholds"][1]["reason"] is None and report["passed"] is False
    md = paths["md"].read_text()
    assert "| bleu4 | n/a (references under 4 tokens) | n/a (references under 4 tokens) |" in md
    assert "| bleu4_gain | n/a (references under 4 tokens) |" in md
    assert "| `bleu4 >= 0.4` | n/a (references under 4 tokens) | FAIL |" in md
    assert paths["png"].stat().st_size > 2000
    assert ("bleu4", "n/a (references under 4 tokens)", "n/a (references under 4 tokens)") in metric_rows(tuned, base)
    print_summary(tuned, base, gains, gates)
    out = capsys.readouterr().out
    assert "FAIL bleu4 >= 0.4 (bleu4 is n/a: references under 4 tokens; a threshold on it fails)" in out
    assert "PASS accuracy >= 0.8 (actual 0.9000)" in out
    assert any(line.split() == ["│", "bleu4", "│", *("n/a (references under 4 tokens)".split()), "│",
                                *("n/a (references under 4 tokens)".split()), "│"] for line in out.splitlines())


def test_a_report_without_base_and_an_na_perplexity_still_draws(tmp_path):
    tuned = {**_scores(0.9, 1.5), "perplexity": NotApplicable("no answer tokens within cutoff_len"),
             "mc_accuracy": NotApplicable("no question left after the 5 shots")}
    paths = write_report(tmp_path, tuned, None, {}, [])
    assert paths["png"].stat().st_size > 2000
    assert json.loads(paths["json"].read_text())["not_applicable"]["tuned"] == {
        "perplexity": "no answer tokens within cutoff_len", "bleu4": BLEU_SHORT,
        "mc_accuracy": "no question left after the 5 shots"}
    assert "| perplexity | - | n/a (no answer tokens within cutoff_len) |" in markdown(tuned, None, {}, [])
