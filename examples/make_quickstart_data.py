"""Write examples/data/parity.jsonl: the quickstart task, with <think> reasoning.

"Is N even or odd?" in English (about 3 in 4) or Chinese — the reasoning copies N's last
digit and classifies it; the answer is one word. Every record asks about a different
number (1-6 digits), and no prompt repeats another exactly or nearly (r1tune's own
near-duplicate test on the prompt text), so whichever records a seeded split holds out
are new questions: the model has to learn the rule, not memorise answers. Seeded; rerun
to rebuild.
"""

import json
import random
from pathlib import Path

EN = ["Is {n} even or odd?", "Is the number {n} even or odd?", "Tell me whether {n} is even or odd.",
      "{n}: even or odd?"]
ZH = ["{n}是偶数还是奇数？", "数字{n}是偶数还是奇数？"]


RECORDS = 1500


def record(rng: random.Random, n: int) -> dict:
    d = n % 10
    odd = d % 2 == 1
    if rng.random() < 0.25:
        question = rng.choice(ZH).format(n=n)
        kind = "奇数" if odd else "偶数"
        reasoning = f"{n}的最后一位是{d}。{d}是{kind}，所以{n}是{kind}。"
        answer = kind
    else:
        question = rng.choice(EN).format(n=n)
        kind = "odd" if odd else "even"
        reasoning = f"The last digit of {n} is {d}. {d} is {kind}, so {n} is {kind}."
        answer = kind
    content = f"<think>\n{reasoning}\n</think>\n\n{answer}"
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": content}]}


def distinct_records(rng: random.Random, count: int) -> list[dict]:
    """`count` records with distinct numbers whose prompts are pairwise neither equal nor near."""
    from r1tune.data.dedup import find_duplicates

    records, used = [], set()
    while len(records) < count:
        while len(records) < count:
            n = rng.randint(0, 10 ** rng.randint(1, 6) - 1)
            if n not in used:
                used.add(n)
                records.append(record(rng, n))
        repeats = find_duplicates([r["messages"][0]["content"] for r in records]).repeats()
        records = [r for i, r in enumerate(records) if i not in repeats]
    return records


def main() -> None:
    out = Path(__file__).parent / "data" / "parity.jsonl"
    out.parent.mkdir(exist_ok=True)
    records = distinct_records(random.Random(1234), RECORDS)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {out}: {len(records)} records")


if __name__ == "__main__":
    main()
