"""Multiple-choice accuracy (MMLU / C-Eval style) by log-likelihood, without generation.

Each question (with optional solved examples before it) becomes one user message:
a header, the question, lettered choices and an "Answer:" cue ("答案：" when the
question is Chinese). It is rendered with the tokenizer's chat template exactly as
generation prompts are (`generation_prompt` with empty_think="mask"). For R1 templates,
whose generation prompt ends with "<think>\\n", that appends the empty reasoning block
"\\n</think>\\n\\n": the choices are scored as the *answer* after skipped reasoning,
the text training puts before an answer that has no reasoning, instead of as the first
words of a reasoning block, which a letter never is.

Every choice's continuation (its letter, or its full text with score="text") is scored
as the summed log-probability of its tokens given the prompt; the prediction is the
argmax. Prompt and continuation are tokenized together as training does (a token
belongs to the continuation when it starts inside it). All choices of `batch_size`
questions go through one right-padded forward pass; for plain-head models only the
continuation positions reach the output head, so no (rows x length x vocab) logits.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from r1tune import ui
from r1tune.data.encode import IGNORE, encode_segments_batch, generation_prompt
from r1tune.errors import UserError
from r1tune.train.chunked_loss import plain_head

LETTERS = "ABCDEFGHIJ"
_CJK = re.compile(r"[\u3400-\u9fff]")


@dataclass
class MCQuestion:
    question: str
    choices: list[str]
    answer: int  # 0-based index into choices
    subject: str = ""


def bundled_sample() -> Path:
    """A 12-question sample: 6 English MMLU-like, 6 Chinese C-Eval-like questions."""
    return Path(str(resources.files("r1tune.resources").joinpath("mc_sample.jsonl")))


def read_mc_file(path) -> list[MCQuestion]:
    """Questions from a JSONL file; a bad line raises UserError naming file, line and field."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        return [_parse(line, f"{path} line {n}") for n, line in enumerate(f, 1) if line.strip()]


def _parse(line: str, where: str) -> MCQuestion:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: invalid JSON ({exc.msg}); write one JSON object per line") from None
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object with fields 'question', 'choices' and 'answer'")
    question, subject = rec.get("question"), rec.get("subject", "")
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: field 'question' is missing or not a non-empty string")
    if not isinstance(subject, str):
        raise UserError(f"{where}: field 'subject' must be a string")
    choices = _choices(rec, where)
    return MCQuestion(question, choices, _answer(rec.get("answer"), len(choices), where), subject)


def _choices(rec: dict, where: str) -> list[str]:
    """The 'choices' list, or the consecutive letter keys "A", "B", ... (C-Eval's layout)."""
    field = "choices" if "choices" in rec else "A, B, ..."
    raw = rec["choices"] if "choices" in rec else [rec[k] for k in _takewhile_keys(rec)]
    if not isinstance(raw, list) or not all(isinstance(c, (str, int, float)) and not isinstance(c, bool)
                                            for c in raw):
        raise UserError(f"{where}: field '{field}' must be a list of strings")
    if not 2 <= len(raw) <= len(LETTERS):
        raise UserError(f"{where}: field '{field}' has {len(raw)} choice(s); a question needs 2 to {len(LETTERS)}")
    return [str(c) for c in raw]


def _takewhile_keys(rec: dict) -> list[str]:
    keys = []
    for letter in LETTERS:
        if letter not in rec:
            break
        keys.append(letter)
    return keys


def _answer(value, count: int, where: str) -> int:
    """A letter ("B") or a 0-based index (1); bool is refused because JSON true would read as 1."""
    letter = value.strip().upper() if isinstance(value, str) else None
    if letter and len(letter) == 1 and letter in LETTERS[:count]:
        return LETTERS.index(letter)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count:
        return value
    if value is None:
        raise UserError(f"{where}: field 'answer' is missing; give a letter such as \"B\" or a 0-based index")
    raise UserError(f"{where}: field 'answer' is {json.dumps(value, ensure_ascii=False)}, out of range for "
                    f"{count} choices (letters A-{LETTERS[count - 1]} or indexes 0-{count - 1})")


def is_chinese(text: str) -> bool:
    return bool(_CJK.search(text))


def _block(q: MCQuestion, solved: bool) -> str:
    cue = "答案：" if is_chinese(q.question) else "Answer:"
    answer = (LETTERS[q.answer] if is_chinese(q.question) else " " + LETTERS[q.answer]) if solved else ""
    lines = [q.question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)]
    return "\n".join(lines + [cue + answer])


def _header(q: MCQuestion) -> str:
    subject = q.subject.replace("_", " ").strip()
    if is_chinese(q.question):
        return f"以下是{'关于' + subject + '的' if subject else ''}单项选择题，请直接给出正确答案的选项字母。"
    about = f" about {subject}" if subject else ""
    return f"The following are multiple choice questions{about}. Reply with the letter of the correct choice."


def select_shots(question: MCQuestion, pool, k: int | None = None) -> list[MCQuestion]:
    """The first k of pool, never the question itself; same subject, then same language first (stable sort)."""
    zh = is_chinese(question.question)
    others = [s for s in pool if s != question]
    others.sort(key=lambda s: (s.subject != question.subject, is_chinese(s.question) != zh))
    return others[:k] if k is not None else others


def user_message(question: MCQuestion, shots=()) -> str:
    return "\n\n".join([_header(question)] + [_block(s, True) for s in shots] + [_block(question, False)])


def build_prompt(tokenizer, question: MCQuestion, shots=()) -> str:
    """The rendered prompt, as generation renders it (empty think block appended for R1)."""
    conversation = [{"role": "user", "content": user_message(question, shots)}, {"role": "assistant", "content": ""}]
    return generation_prompt(tokenizer, conversation, "mask")


def continuations(question: MCQuestion, score: str = "letter") -> list[str]:
    if score not in ("letter", "text"):
        raise ValueError(f"score must be 'letter' or 'text', not {score!r}")
    return list(LETTERS[:len(question.choices)]) if score == "letter" else list(question.choices)


@torch.no_grad()
def continuation_logprobs(model, tokenizer, rows: list[tuple[str, str]]) -> list[float]:
    """Summed log p(continuation | prompt) of each (prompt, continuation) row, in one padded forward."""
    examples = encode_segments_batch(tokenizer, [[(p, False), (c, True)] for p, c in rows])
    width = max(len(e.input_ids) for e in examples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(rows), width), pad)
    labels, mask = torch.full_like(ids, IGNORE), torch.zeros_like(ids)
    for i, e in enumerate(examples):  # right padding: real tokens keep positions 0..n-1
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    targets = labels[:, 1:]  # position j predicts token j+1
    if (targets == IGNORE).all(dim=1).any():
        raise ValueError("a continuation has no token of its own (merged into the prompt's last token)")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    rows_at, cols_at = (targets != IGNORE).nonzero(as_tuple=True)
    logits = _logits_at(model, ids.to(device), mask.to(device), rows_at.to(device), cols_at.to(device))
    token_lp = logits.float().log_softmax(-1).gather(1, targets[rows_at, cols_at].to(device)[:, None])[:, 0]
    return torch.zeros(len(rows), device=device).index_add_(0, rows_at.to(device), token_lp).tolist()


def _logits_at(model, ids, mask, rows, cols) -> torch.Tensor:
    """Logits at the given positions; plain-head models apply the head to those positions only."""
    split = plain_head(model)
    if split is None:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, cols]
    decoder, head = split
    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return head(hidden[rows, cols])


def score_multiple_choice(model, tokenizer, questions, shots=(), batch_size: int = 8,
                          score: str = "letter", num_shots: int | None = None, progress: str | None = None) -> dict:
    """Accuracy overall and per subject; shots: solved examples (a dev set, or the questions themselves,
    since each question is left out of its own shots), the first num_shots of them (all when None).
    `progress`: a phase name; the batches then get a line and a progress bar (r1tune.ui.progress)."""
    questions = list(questions)
    was_training = model.training
    model.eval()
    predictions = []
    try:
        starts = range(0, len(questions), batch_size)
        for start in ui.progress(starts, progress) if progress else starts:
            batch = questions[start:start + batch_size]
            rows = [(build_prompt(tokenizer, q, select_shots(q, shots, num_shots)), c)
                    for q in batch for c in continuations(q, score)]
            scores = iter(continuation_logprobs(model, tokenizer, rows))
            for i, q in enumerate(batch, start):
                lp = [next(scores) for _ in q.choices]
                predictions.append({"index": i, "predicted": lp.index(max(lp)), "answer": q.answer, "logprobs": lp})
    finally:
        model.train(was_training)
    return _summary(questions, predictions)


def _summary(questions: list[MCQuestion], predictions: list[dict]) -> dict:
    hits: dict[str, list[bool]] = defaultdict(list)
    for q, p in zip(questions, predictions):
        hits[q.subject].append(p["predicted"] == p["answer"])
    correct = sum(sum(h) for h in hits.values())
    return {"accuracy": correct / max(len(questions), 1), "correct": correct, "total": len(questions),
            "per_subject": {s: sum(h) / len(h) for s, h in sorted(hits.items()) if s},
            "predictions": predictions}
