"""Write examples/data/parity.jsonl: the quickstart task, with <think> reasoning.

"Is N even or odd?" — the reasoning copies N's last digit and classifies it; the
answer is one word. Numbers have 1-6 digits, so held-out prompts are new numbers
and the model has to learn the rule, not memorise answers. Seeded; rerun to rebuild.
"""

import json
import random
from pathlib import Path

EN = ["Is {n} even or odd?", "Is the number {n} even or odd?", "Tell me whether {n} is even or odd.",
      "{n}: even or odd?"]
ZH = ["{n}是偶数还是奇数？", "数字{n}是偶数还是奇数？"]


def record(rng: random.Random) -> dict:
    n = rng.randint(0, 10 ** rng.randint(1, 6) - 1)
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


def main() -> None:
    rng = random.Random(1234)
    out = Path(__file__).parent / "data" / "parity.jsonl"
    out.parent.mkdir(exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for _ in range(1500):
            f.write(json.dumps(record(rng), ensure_ascii=False) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
