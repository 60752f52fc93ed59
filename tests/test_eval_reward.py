"""`r1tune eval` of a `stage: rm` reward model: its value head scores held-out pairs (TRL's rewards/*) and
plain prompt/answer records (rewards/mean, one score per record); the scores are the model's own (recomputed
here from the saved adapter and head); user mistakes are one line and exit 2."""

import json
import math
import shutil

import pytest
import torch

from r1tune.cli import main
from r1tune.evaluation.run import run_eval
from r1tune.train.stages.registry import run_stage
from tests.conftest import make_cfg, write_jsonl

REWARD_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def _pairs():
    return [{"instruction": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.", "rejected": "No idea."}
            for a in range(1, 7) for b in range(1, 5)]


KEYS = dict(stage="rm", learning_rate=5e-3, max_steps=2, val_size=8, bf16=False)


@pytest.fixture(scope="module")
def rm_run(tiny_qwen, tmp_path_factory):
    """A 2-step reward model on 24 pairs, 8 held out."""
    folder = tmp_path_factory.mktemp("rm")
    data = write_jsonl(folder / "pairs.jsonl", _pairs())
    run_stage(make_cfg(tiny_qwen, data, folder / "out", **KEYS))
    assert (folder / "out" / "value_head.safetensors").is_file()
    return tiny_qwen, data, folder / "out"


def _direct_score(base, out, question: str, answer: str) -> float:
    """The reward of one (question, answer) from the saved adapter and head, one unpadded row, no eval code."""
    from peft import PeftModel

    from r1tune.data.encode import encode_conversation
    from r1tune.data.templates import apply_template_choice
    from r1tune.models.loading import load_model, load_tokenizer
    from r1tune.models.value_head import load_value_head

    tokenizer = load_tokenizer(str(out), is_model_dir=False)
    apply_template_choice(tokenizer, "auto", "test", needs_template=True)
    example = encode_conversation(tokenizer, [{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}], 96)
    model = PeftModel.from_pretrained(load_model(str(base)), str(out)).eval()
    head = load_value_head(out)
    with torch.no_grad():
        last = model.get_base_model().model(input_ids=torch.tensor([example.input_ids])).last_hidden_state[0, -1]
        return float(head(last))


def _predictions(out):
    return [json.loads(line) for line in (out / "eval" / "predictions_tuned.jsonl").read_text().splitlines()]


def test_eval_scores_held_out_pairs_with_the_value_head(rm_run, capsys):
    base, data, out = rm_run
    code = run_eval(make_cfg(base, data, out, **KEYS, eval_thresholds=["rewards/accuracies >= 0",
                                                                       "rewards/margins > -1000"]))
    assert code == 0
    report = json.loads((out / "eval" / "eval_report.json").read_text())
    tuned = report["tuned"]
    assert report["base"] is None and report["passed"]
    assert all(math.isfinite(tuned[name]) for name in REWARD_NAMES), tuned
    assert 0.0 <= tuned["rewards/accuracies"] <= 1.0 and tuned["pairs"] == 8
    assert tuned["rewards/margins"] == pytest.approx(tuned["rewards/chosen"] - tuned["rewards/rejected"], abs=1e-6)
    rows = _predictions(out)
    assert len(rows) == 8
    assert tuned["rewards/chosen"] == pytest.approx(sum(r["score_chosen"] for r in rows) / 8, abs=1e-6)
    assert tuned["rewards/accuracies"] == sum(r["correct"] for r in rows) / 8
    assert all(r["correct"] == (r["score_chosen"] > r["score_rejected"]) for r in rows)
    first = rows[0]
    assert first["score_chosen"] == pytest.approx(_direct_score(base, out, first["question"], first["chosen"]),
                                                  abs=1e-5)
    assert first["score_rejected"] == pytest.approx(_direct_score(base, out, first["question"], first["rejected"]),
                                                    abs=1e-5)
    printed = capsys.readouterr().out
    assert "reward scores of 8 pairs: 2 batches" in printed and "PASS rewards/accuracies >= 0" in printed


def test_eval_scores_plain_prompt_answer_records(rm_run, tmp_path):
    base, _, out = rm_run
    plain = write_jsonl(tmp_path / "plain.jsonl", [
        {"instruction": f"What is {a} plus 1?", "output": f"The answer is {a + 1}."} for a in range(1, 6)] + [
        {"messages": [{"role": "user", "content": "What is 9 plus 9?"}, {"role": "assistant", "content": "18."}]}])
    eval_dir = tmp_path / "eval"
    cfg = make_cfg(base, tmp_path / "unused.jsonl", out, **{**KEYS, "val_size": 0}, eval_dataset=str(plain),
                   eval_output_dir=str(eval_dir))
    assert run_eval(cfg) == 0
    tuned = json.loads((eval_dir / "eval_report.json").read_text())["tuned"]
    rows = [json.loads(line) for line in (eval_dir / "predictions_tuned.jsonl").read_text().splitlines()]
    assert tuned["answers"] == len(rows) == 6 and "rewards/accuracies" not in tuned
    assert all(math.isfinite(r["score"]) for r in rows)
    assert tuned["rewards/mean"] == pytest.approx(sum(r["score"] for r in rows) / 6, abs=1e-6)
    assert len({round(r["score"], 6) for r in rows}) > 1  # each record gets its own score
    last = rows[-1]
    assert (last["question"], last["answer"]) == ("What is 9 plus 9?", "18.")
    assert last["score"] == pytest.approx(_direct_score(base, out, last["question"], last["answer"]), abs=1e-5)


def _config(tmp_path, base, data, out, **keys):
    raw = dict(model_name_or_path=str(base), dataset=str(data), output_dir=str(out), report_to="none",
               cutoff_len=96, seed=7, **{**KEYS, **keys})
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")  # JSON is YAML
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_an_rm_config_without_a_value_head_exits_2(rm_run, tmp_path, capsys):
    base, data, out = rm_run
    headless = tmp_path / "headless"
    shutil.copytree(out, headless, ignore=shutil.ignore_patterns("value_head.safetensors", "eval"))
    assert main(["eval", str(_config(tmp_path, base, data, headless))]) == 2
    assert "value_head.safetensors" in _one_line_error(capsys)
    assert not (headless / "eval").exists()


def test_wrong_data_and_generation_keys_exit_2(rm_run, tmp_path, capsys):
    base, data, out = rm_run
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "just some text"}])
    assert main(["eval", str(_config(tmp_path, base, data, out, val_size=0, eval_dataset=str(text)))]) == 2
    line = _one_line_error(capsys)
    assert "text.jsonl line 1" in line and "plain text" in line
    assert main(["eval", str(_config(tmp_path, base, data, out, eval_robustness="all"))]) == 2
    assert "'eval_robustness'" in _one_line_error(capsys)
    # the val_size split is read as training read it: a pair without 'rejected' is training's error
    bad = write_jsonl(tmp_path / "bad.jsonl", _pairs()[:20] + [{"instruction": "Q?", "chosen": "A."}])
    assert main(["eval", str(_config(tmp_path, base, bad, out))]) == 2
    assert "bad.jsonl line 21" in (line := _one_line_error(capsys)) and "'rejected'" in line
