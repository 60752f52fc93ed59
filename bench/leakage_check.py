"""What the validation-leakage check costs when a data cache entry is built.

Times data.leakage.find_leakage on synthetic prompts of 30 words: 100,000 training records
(streamed in chunks of 1,000, as the cache build reads them) against 1,000 validation records,
once with no repeats and once with 10 % of the validation prompts copied from training.

    python bench/leakage_check.py          # ~10 s
"""

from __future__ import annotations

import random
import time

from r1tune.data.kinds import Sample
from r1tune.data.leakage import find_leakage
from r1tune.envinfo import cpu_features

TRAIN, VAL, WORDS = 100_000, 1_000, 30


def chat(rng: random.Random, vocabulary: list[str], index: int) -> Sample:
    question = " ".join(rng.choices(vocabulary, k=WORDS))
    return Sample("chat", f"data.jsonl line {index}", [{"role": "user", "content": question},
                                                       {"role": "assistant", "content": "ok"}])


def main() -> None:
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(5000)]
    train = [chat(rng, vocabulary, i) for i in range(TRAIN)]
    fresh = [chat(rng, vocabulary, TRAIN + i) for i in range(VAL)]
    copied = train[: VAL // 10] + fresh[VAL // 10:]
    print(cpu_features())
    for name, val in (("no repeats", fresh), ("10 % copied", copied)):
        start = time.perf_counter()
        found = find_leakage(val, (train[i:i + 1000] for i in range(0, TRAIN, 1000)))
        print(f"{name}: {time.perf_counter() - start:.1f} s for {TRAIN:,} training x {VAL:,} validation prompts; "
              f"{found.leaked} found")


if __name__ == "__main__":
    main()
