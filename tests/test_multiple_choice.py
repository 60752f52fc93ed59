"""Multiple-choice scoring: batched log-likelihoods match unbatched ones, accuracy, prompts, file errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from r1tune.data.templates import TEMPLATES
from r1tune.errors import UserError
from r1tune.evaluation.multiple_choice import (
    LETTERS, MCQuestion, build_prompt, bundled_sample, continuations, is_chinese, read_mc_file,
    score_multiple_choice, select_shots)


@pytest.fixture(scope="module")
def sample() -> list[MCQuestion]:
    return read_mc_file(bundled_sample())


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _hand_logprob(model, tokenizer, prompt: str, continuation: str) -> float:
    """One unbatched forward; continuation tokens are those starting at or after the prompt's end."""
    enc = tokenizer(prompt + continuation, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"])
    with torch.no_grad():
        lp = model(input_ids=ids[None]).logits[0].float().log_softmax(-1)
    positions = [t for t, (start, _) in enumerate(enc["offset_mapping"]) if start >= len(prompt)]
    assert positions and positions[0] > 0
    return sum(lp[t - 1, ids[t]].item() for t in positions)


@pytest.mark.parametrize("model_name", ["tiny_qwen", "tiny_ds"])
@pytest.mark.parametrize("score,num_shots", [("letter", 2), ("text", 0)])
def test_batched_logprobs_match_unbatched(request, sample, model_name, score, num_shots):
    model, tokenizer = _load(request.getfixturevalue(model_name))
    # batches of 5 questions mix languages and shot counts, so rows pad to very different lengths
    result = score_multiple_choice(model, tokenizer, sample, shots=sample, batch_size=5, score=score,
                                   num_shots=num_shots)
    worst = 0.0
    for q, pred in zip(sample, result["predictions"]):
        prompt = build_prompt(tokenizer, q, select_shots(q, sample, num_shots))
        hand = [_hand_logprob(model, tokenizer, prompt, c) for c in continuations(q, score)]
        worst = max(worst, max(abs(a - b) for a, b in zip(hand, pred["logprobs"])))
        assert pred["predicted"] == max(range(len(hand)), key=hand.__getitem__)
    assert worst < 1e-4
    assert len(result["predictions"]) == len(sample) and 0.0 <= result["accuracy"] <= 1.0


class CheatingModel(torch.nn.Module):
    """Logits that put all mass on one letter: the row's right answer, or always `constant`."""

    def __init__(self, tokenizer, questions, constant: str | None = None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.questions, self.constant = tokenizer, questions, constant

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, len(self.tokenizer))
        for r, row in enumerate(input_ids):
            text = self.tokenizer.decode(row)
            asked = max(self.questions, key=lambda q: text.rfind(q.question))  # the last question in the row
            letter = self.constant or LETTERS[asked.answer]
            logits[r, :, self.tokenizer(letter, add_special_tokens=False)["input_ids"][-1]] = 30.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("num_shots", [0, 3])
def test_accuracy_of_cheating_and_constant_models(tiny_ds, sample, num_shots):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_ds)
    right = score_multiple_choice(CheatingModel(tokenizer, sample), tokenizer, sample, shots=sample,
                                  batch_size=4, num_shots=num_shots)
    assert right["accuracy"] == 1.0 and set(right["per_subject"].values()) == {1.0}
    assert [p["predicted"] for p in right["predictions"]] == [q.answer for q in sample]

    always_a = score_multiple_choice(CheatingModel(tokenizer, sample, "A"), tokenizer, sample, batch_size=3)
    share = sum(q.answer == 0 for q in sample) / len(sample)
    assert 0 < share < 1 and always_a["accuracy"] == pytest.approx(share)
    assert always_a["per_subject"]["biology"] == 0.5 and always_a["per_subject"]["化学"] == 1.0
    assert always_a["per_subject"]["geography"] == 0.0


def test_prompts_zero_vs_few_shot(tokenizer, sample):
    q = sample[0]
    shots = select_shots(q, sample, 3)
    assert q not in shots and len(shots) == 3 and shots[0].subject == q.subject
    assert select_shots(q, sample, 3) == shots  # deterministic
    zero, few = build_prompt(tokenizer, q), build_prompt(tokenizer, q, shots)
    assert zero != few and few.count(q.question) == 1 and all(s.question in few for s in shots)
    assert "Answer: C" not in zero and f"Answer: {LETTERS[shots[0].answer]}" in few
    # R1 opens "<think>\n": the choices are scored after an empty reasoning block
    assert zero.endswith("Answer:<｜Assistant｜><think>\n\n</think>\n\n")
    zh = sample[6]
    assert is_chinese(zh.question) and "答案：<｜Assistant｜>" in build_prompt(tokenizer, zh)


def test_prompt_without_think_template(tokenizer, sample):
    plain = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    plain.chat_template = TEMPLATES["deepseek_v3"]
    prompt = build_prompt(plain, sample[0])
    assert prompt.endswith("Answer:<｜Assistant｜>") and "</think>" not in prompt


def test_bundled_sample_parses_both_languages(sample):
    assert len(sample) == 12
    assert sum(is_chinese(q.question) for q in sample) == 6
    assert all(2 <= len(q.choices) <= 10 and 0 <= q.answer < len(q.choices) and q.subject for q in sample)
    assert sample[4].answer == 1 and sample[5].choices == ["5", "6", "8", "7"]  # index answer, letter keys


GOOD = {"question": "q?", "choices": ["a", "b"], "answer": "A"}


@pytest.mark.parametrize("line,field", [
    ("{not json", "invalid JSON"),
    (json.dumps({"choices": ["a", "b"], "answer": "A"}), "'question'"),
    (json.dumps({"question": "q?", "choices": ["a"], "answer": 0}), "'choices'"),
    (json.dumps({"question": "q?", "choices": "ab", "answer": 0}), "'choices'"),
    (json.dumps({"question": "q?", "A": "x", "answer": "A"}), "'A, B, ...'"),
    (json.dumps({"question": "q?", "choices": ["a", "b"], "answer": "C"}), "'answer'"),
    (json.dumps({"question": "q?", "choices": ["a", "b"], "answer": 2}), "'answer'"),
    (json.dumps({"question": "q?", "choices": ["a", "b"], "answer": True}), "'answer'"),
    (json.dumps({"question": "q?", "choices": ["a", "b"]}), "'answer'"),
    (json.dumps({"question": "q?", "choices": ["a", "b"], "answer": "AB"}), "'answer'"),
])
def test_read_errors_name_file_line_and_field(tmp_path, line, field):
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        read_mc_file(path)
    message = str(err.value)
    assert str(path) in message and "line 3" in message and field in message
    assert message.count(". ") == 0  # one sentence


def test_read_accepts_letter_keys_and_index(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({"question": "q?", "A": "x", "B": "y", "C": "z", "answer": "c"}) + "\n"
                    + json.dumps({**GOOD, "answer": 1, "subject": "s"}) + "\n", encoding="utf-8")
    assert read_mc_file(path) == [MCQuestion("q?", ["x", "y", "z"], 2), MCQuestion("q?", ["a", "b"], 1, "s")]
