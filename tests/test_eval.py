"""`r1tune eval`: report files, thresholds (exit 1 on FAIL), config errors, robustness and multiple choice,
n/a metrics (BLEU-4 of the quickstart's one-word answers) and a line per phase."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from r1tune.config import validate_config
from r1tune.errors import UserError
from r1tune.evaluation.report import derived, judge, parse_thresholds
from r1tune.evaluation.run import run_eval
from r1tune.train.stages.sft import run_sft
from tests.conftest import make_cfg


@pytest.fixture(scope="module")
def trained(tiny_qwen, tmp_path_factory):
    """A short LoRA run on the first 64 quickstart records, 8 held out."""
    from tests.conftest import PARITY

    folder = tmp_path_factory.mktemp("eval")
    data = folder / "data.jsonl"
    data.write_text("\n".join(PARITY.read_text(encoding="utf-8").splitlines()[:64]) + "\n", encoding="utf-8")
    raw = dict(val_size=8, max_steps=6, bf16=False, max_new_tokens=12, eval_generate_samples=4)
    run_sft(make_cfg(tiny_qwen, data, folder / "out", **raw))
    return tiny_qwen, data, folder / "out", raw


def eval_cfg(trained, **keys):
    model, data, out, raw = trained
    return make_cfg(model, data, out, **{**raw, **keys})


def test_report_predictions_and_a_passing_gate(trained, capsys):
    code = run_eval(eval_cfg(trained, eval_thresholds=["perplexity > 0", "exact_match >= 0"]))
    folder = trained[2] / "eval"
    report = json.loads((folder / "eval_report.json").read_text())
    assert code == 0 and report["passed"]
    for key in ("perplexity", "bleu4", "rouge_l", "exact_match", "accuracy", "f1_macro", "f1_micro", "reasoning_tokens"):
        assert key in report["tuned"] and key in report["base"]
    assert "ppl_drop" in report["derived"] and "| threshold |" in (folder / "eval_report.md").read_text()
    assert len((folder / "predictions_base.jsonl").read_text().splitlines()) == 8
    # one-word answers: BLEU-4 is n/a, with the reason, instead of 0.0000
    assert report["tuned"]["bleu4"] is None and report["derived"]["bleu4_gain"] is None
    assert report["not_applicable"]["tuned"] == {"bleu4": "references under 4 tokens"}
    assert isinstance(report["tuned"]["rouge_l"], float) and isinstance(report["tuned"]["f1_macro"], float)
    out = capsys.readouterr().out
    assert "n/a (references under 4 tokens)" in out and "0.0000" not in next(
        line for line in out.splitlines() if " bleu4 " in line)
    phases = [line for line in out.splitlines() if re.fullmatch(r"(tuned|base) (perplexity|generation): \d+ batch(es)?",
                                                                line)]
    assert [p.split(":")[0] for p in phases] == ["tuned perplexity", "tuned generation", "base perplexity",
                                                 "base generation"]


def test_a_failing_threshold_exits_1_from_the_cli(trained, tmp_path):
    model, data, out, raw = trained
    config = tmp_path / "run.yaml"
    keys = {**raw, "model_name_or_path": str(model), "dataset": str(data), "output_dir": str(out),
            "cutoff_len": 96, "seed": 7, "eval_compare_base": False, "eval_thresholds": ["bleu4 >= 0.999"]}
    config.write_text(json.dumps(keys), encoding="utf-8")  # JSON is YAML
    proc = subprocess.run([sys.executable, "-m", "r1tune", "eval", str(config)], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "FAIL bleu4 >= 0.999 (bleu4 is n/a: references under 4 tokens; a threshold on it fails)" in proc.stdout
    report = out / "eval"
    assert f"report: {report / 'eval_report.json'}, {report / 'eval_report.md'}, {report / 'eval_report.png'}" \
        in proc.stdout.splitlines()  # piped output is not wrapped, so the paths stay whole


def test_threshold_parsing_and_unknown_metrics():
    gates = parse_thresholds(["bleu4 >= 0.45", "f1_gain>=0.15", "ppl_drop > 0.35"])
    assert [(g.metric, g.op, g.value) for g in gates] == [("bleu4", ">=", 0.45), ("f1_macro_gain", ">=", 0.15),
                                                          ("ppl_drop", ">", 0.35)]
    with pytest.raises(UserError, match="not 'metric >= number'"):
        parse_thresholds(["bleu4 at least 0.4"])
    tuned, base = {"perplexity": 4.0, "f1_macro": 0.8}, {"perplexity": 10.0, "f1_macro": 0.5}
    gains = derived(tuned, base)
    assert gains == pytest.approx({"ppl_drop": 0.6, "f1_macro_gain": 0.3})
    assert [g.passed for g in judge(gates[1:], tuned, gains)] == [True, True]
    with pytest.raises(UserError, match="did not measure; measured: f1_macro, f1_macro_gain"):
        judge(parse_thresholds(["rouge_l >= 0.1"]), {"f1_macro": 0.8}, {"f1_macro_gain": 0.3})


def test_eval_needs_a_trained_output_dir(tiny_qwen, parity_file, tmp_path):
    with pytest.raises(UserError, match="holds no trained model"):
        run_eval(make_cfg(tiny_qwen, parity_file, tmp_path / "nothing", val_size=8))


def test_robustness_and_multiple_choice_are_reported(trained, capsys):
    code = run_eval(eval_cfg(trained, eval_compare_base=False, eval_robustness="all", eval_mc_file="bundled",
                             eval_thresholds=["robust_accuracy >= 0"]))
    report = json.loads((trained[2] / "eval" / "eval_report.json").read_text())["tuned"]
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert "tuned robustness: 4 kinds" in out and "tuned multiple choice: 2 batches" in out  # 12 questions, 8 a batch
    assert sum(line.startswith("tuned robustness typos: ") for line in out) == 1
    for kind in ("typos", "synonyms", "char_noise", "distractor"):
        assert 0.0 <= report[f"robust_accuracy_{kind}"] <= 1.0
    assert 0.0 <= report["mc_accuracy"] <= 1.0 and "robust_drop" in report


def test_threshold_config_values_are_strings():
    with pytest.raises(UserError, match="eval_thresholds"):
        validate_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "eval_thresholds": "bleu4>=1"})


def test_sampling_settings_reach_generation(trained):
    from r1tune.models.generate import generate_texts
    from r1tune.models.run_loading import load_run

    model, tokenizer = load_run(str(trained[2]))
    prompts = ["<｜User｜>Is 12 even or odd?<｜Assistant｜>"] * 4
    greedy = generate_texts(model, tokenizer, prompts, 12)
    torch.manual_seed(0)
    hot = generate_texts(model, tokenizer, prompts, 12, sampling={"temperature": 5.0, "top_p": 1.0})
    assert len(set(greedy)) == 1 and len(set(hot)) > 1  # greedy repeats itself; hot sampling does not


def test_eval_perplexity_is_trainings_held_out_loss(trained):
    """Training's last eval loss and r1tune eval's perplexity score the same held-out tokens with the same
    weights, so they agree. (Generation once left the tokenizer padding batches to the left, save_pretrained
    wrote that into tokenizer.json, and every sample `r1tune eval` encoded with it was padded: 1.72 vs 1.06
    on the quickstart.)"""
    import math

    assert run_eval(eval_cfg(trained, eval_compare_base=False)) == 0
    tuned = json.loads((trained[2] / "eval" / "eval_report.json").read_text())["tuned"]
    after = json.loads((trained[2] / "eval_results.json").read_text())["after"]
    assert tuned["perplexity"] == pytest.approx(math.exp(after["eval_loss"]), rel=1e-4)
    assert json.loads((trained[2] / "tokenizer.json").read_text())["padding"] is None


def test_encoding_ignores_a_padding_tokenizer(tokenizer):
    from r1tune.data.encode import encode_segments_batch, encode_texts

    batch = [[("Is 12 even or odd?", False), ("even", True)], [("Is 123456 even or odd? Tell me.", False), ("odd", True)]]
    plain = encode_segments_batch(tokenizer, batch), encode_texts(tokenizer, ["a b", "a much longer text here"])
    tokenizer.backend_tokenizer.enable_padding(direction="left", pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    try:
        padded = encode_segments_batch(tokenizer, batch), encode_texts(tokenizer, ["a b", "a much longer text here"])
        assert tokenizer.backend_tokenizer.padding is not None  # the setting itself is left as it was
    finally:
        tokenizer.backend_tokenizer.no_padding()
    assert [(e.input_ids, e.labels) for e in padded[0]] == [(e.input_ids, e.labels) for e in plain[0]]
    assert [e.input_ids for e in padded[1]] == [e.input_ids for e in plain[1]]


def test_a_dpo_run_is_scored_against_the_chosen_answers(tiny_qwen, tmp_path):
    """Held-out preference pairs: generation is compared with the chosen answer, perplexity is the chosen row's
    (it used to stop with a traceback: the pairs went to the perplexity batches as they are)."""
    from r1tune.train.stages.registry import run_stage
    from tests.conftest import write_jsonl

    pairs = [{"instruction": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.", "rejected": "No idea."}
             for a in range(1, 5) for b in range(1, 4)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    keys = dict(stage="dpo", max_steps=1, val_size=4, bf16=False, max_new_tokens=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_stage(make_cfg(tiny_qwen, data, tmp_path / "out", **keys))
    finally:
        torch.set_num_threads(threads)
    assert run_eval(make_cfg(tiny_qwen, data, tmp_path / "out", **keys, eval_compare_base=False)) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "eval" / "predictions_tuned.jsonl").read_text().splitlines()]
    chosen = {p["instruction"]: p["chosen"] for p in pairs}
    assert len(rows) == 4 and all(r["reference"] == chosen[r["question"]] for r in rows)
    report = json.loads((tmp_path / "out" / "eval" / "eval_report.json").read_text())
    assert report["tuned"]["perplexity"] > 1.0
