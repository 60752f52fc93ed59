"""Writes the grpo example's data (seeded): examples/data/grpo_sft.jsonl, 2,000 SFT records from a
careless teacher, and examples/data/grpo_prompts.jsonl, 1,000 new questions with their answers.

The task: "Of 31 and 83, which is smaller?" (or larger), two numbers below 100. Every SFT answer
reasons first and then answers, "<think>31 < 83</think>31", but the teacher is careless: it gets
"larger" questions right 85 % of the time and "smaller" ones only 25 % of the time, otherwise
naming the other number (with the comparison written the wrong way round). Supervised fine-tuning
copies that: the model learns the format and to read off the two numbers, and it learns the
teacher's habits too, so its greedy answer to a "smaller" question is mostly wrong while sampling
still names the right number now and then. GRPO's `accuracy` reward (the number after `</think>`
must equal the record's `answer`) can tell the two apart; the run that starts from the SFT model
has to find the right answers by itself.

The prompt records ({"instruction", "answer"}) ask about pairs no SFT record asks about, and no
prompt in either file repeats another exactly or nearly (r1tune's own near-duplicate test), so
whichever prompts a seeded validation split holds out are new questions. The numbers come first
in the question on purpose: two questions that differ only in a last digit before the "?" would
count as near duplicates.

    python examples/make_grpo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
SFT_COUNT, PROMPT_COUNT = 2000, 1000
# How often the careless teacher's SFT answer is right, per kind of question.
TEACHER_RIGHT = {"larger": 0.85, "smaller": 0.25}
QUESTION = "Of {a} and {b}, which is {kind}?"


def question(a: int, b: int, kind: str) -> str:
    return QUESTION.format(a=a, b=b, kind=kind)


def right_answer(a: int, b: int, kind: str) -> int:
    return max(a, b) if kind == "larger" else min(a, b)


def sft_record(rng: random.Random, a: int, b: int, kind: str, teacher_right: dict) -> dict:
    """The teacher's answer, right with probability teacher_right[kind]; a wrong one names the
    other number and states the comparison the wrong way round, as a careless reader would."""
    right = right_answer(a, b, kind)
    pick = right if rng.random() < teacher_right[kind] else a + b - right
    other = a + b - pick
    sign = ">" if kind == "larger" else "<"
    return {"instruction": question(a, b, kind), "output": f"<think>{pick} {sign} {other}</think>{pick}"}


def prompt_record(a: int, b: int, kind: str) -> dict:
    return {"instruction": question(a, b, kind), "answer": str(right_answer(a, b, kind))}


def distinct_questions(rng: random.Random, count: int) -> list[tuple[int, int, str]]:
    """`count` (a, b, kind), each about a different pair of numbers (in either order, whichever the
    kind), whose questions are pairwise neither equal nor near (r1tune's own near-duplicate test),
    so no prompt repeats an SFT record or another prompt."""
    from r1tune.data.dedup import find_duplicates

    picked, seen = [], set()
    while len(picked) < count:
        while len(picked) < count:
            a, b, kind = rng.randint(0, 99), rng.randint(0, 99), rng.choice(("larger", "smaller"))
            if a != b and (min(a, b), max(a, b)) not in seen:
                seen.add((min(a, b), max(a, b)))
                picked.append((a, b, kind))
        repeats = find_duplicates([question(*q) for q in picked]).repeats()
        picked = [q for i, q in enumerate(picked) if i not in repeats]
    return picked


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main(out: Path = DATA, seed: int = 42, teacher_right: dict = TEACHER_RIGHT) -> None:
    rng = random.Random(seed)
    questions = distinct_questions(rng, SFT_COUNT + PROMPT_COUNT)
    sft = [sft_record(rng, *q, teacher_right) for q in questions[:SFT_COUNT]]
    prompts = [prompt_record(*q) for q in questions[SFT_COUNT:]]
    write_jsonl(out / "grpo_sft.jsonl", sft)
    write_jsonl(out / "grpo_prompts.jsonl", prompts)
    right = sum(r["output"].endswith(f"</think>{right_answer(*q)}") for r, q in zip(sft, questions))
    print(f"wrote {len(sft)} SFT records ({right / len(sft):.0%} right) to {out / 'grpo_sft.jsonl'} "
          f"and {len(prompts)} prompts to {out / 'grpo_prompts.jsonl'}")


if __name__ == "__main__":
    main()
