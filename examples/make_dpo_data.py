"""Writes examples/data/dpo_style.jsonl: 1,200 preference pairs for the dpo example (seeded).

Each prompt is a small arithmetic question in English or Chinese. The chosen answer is friendly and
correct ("Sure! 6 * 3 = 18."); the rejected one is curt and off by one ("Ugh. 6 * 3 = 19. Stop asking.").
A model that learns the preference must pick up both the tone and the arithmetic. Every prompt is
distinct, so the held-out pairs never repeat a training prompt.

    python examples/make_dpo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "dpo_style.jsonl"
COUNT = 1200
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
ZH_OPS = {"+": "加", "-": "减", "*": "乘以"}


def pair(rng: random.Random, a: int, b: int, op: str, chinese: bool) -> dict:
    right = OPS[op](a, b)
    wrong = right + rng.choice((-1, 1))
    if chinese:
        question = f"{a} {ZH_OPS[op]} {b} 等于多少？"
        return {"instruction": question, "chosen": f"好的！{a} {ZH_OPS[op]} {b} 等于 {right}。",
                "rejected": f"烦死了。{a} {ZH_OPS[op]} {b} 等于 {wrong}。别再问了。"}
    return {"instruction": f"What is {a} {op} {b}?", "chosen": f"Sure! {a} {op} {b} = {right}.",
            "rejected": f"Ugh. {a} {op} {b} = {wrong}. Stop asking."}


def distinct_pairs(rng: random.Random, count: int) -> list[dict]:
    """`count` pairs whose prompts are pairwise neither equal nor near (r1tune's own near-duplicate
    test), so a seeded validation split never holds a prompt that training also has."""
    from r1tune.data.dedup import find_duplicates

    records, seen = [], set()
    while len(records) < count:
        while len(records) < count:
            a, b, op, chinese = rng.randint(0, 999), rng.randint(0, 99), rng.choice("+-*"), rng.random() < 0.3
            if (a, b, op, chinese) not in seen:
                seen.add((a, b, op, chinese))
                records.append(pair(rng, a, b, op, chinese))
        repeats = find_duplicates([r["instruction"] for r in records]).repeats()
        records = [r for i, r in enumerate(records) if i not in repeats]
    return records


def main() -> None:
    records = distinct_pairs(random.Random(42), COUNT)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(records)} pairs to {OUT}")


if __name__ == "__main__":
    main()
