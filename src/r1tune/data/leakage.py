"""Validation prompts that training also has: held-out scores that partly measure memory.

A validation record leaks when the prompt of a training record is the same after normalisation
(exact) or near it (MinHash similarity of 5-character shingles >= NEAR_THRESHOLD, as `data stats`
counts near duplicates). The prompt is what the model is asked: every turn but the final answer
(chat, classification, KTO), the prompt turns of a preference pair, or the whole text (pretraining).
The training side is streamed in chunks: only the validation prompts' signatures and one location
string per training record (to name where a repeat came from) are held in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from r1tune.data.dedup import find_repeats
from r1tune.data.kinds import Sample
from r1tune.errors import UserError

NEAR_THRESHOLD = 0.8
EXAMPLES = 3


@dataclass
class Leakage:
    checked: int = 0  # validation records compared
    exact: int = 0  # of them, repeating a training prompt exactly
    near: int = 0  # of them, near a training prompt (and not exact)
    examples: list[list[str]] = field(default_factory=list)  # [validation where, training where, "exact"|"near"]

    @property
    def leaked(self) -> int:
        return self.exact + self.near

    def describe(self) -> str:
        shown = "; ".join(f"{v} {'=' if kind == 'exact' else '≈'} {t}" for v, t, kind in self.examples)
        return (f"{self.leaked} of {self.checked} validation prompts are also training prompts "
                f"({self.exact} exactly, {self.near} nearly; e.g. {shown}), so held-out scores partly measure "
                "memory; deduplicate the data (`r1tune data stats` counts duplicates) or give a separate "
                "eval_dataset")


def prompt_text(sample: Sample) -> str:
    if sample.kind == "text":
        return sample.text
    turns = sample.messages if sample.kind in ("preference", "prompt") else sample.messages[:-1]
    return "\n".join(str(turn.get("content") or "") for turn in turns)


def find_leakage(val_samples: list[Sample], train_chunks: Iterable[list[Sample]]) -> Leakage:
    """Compare every validation prompt with the prompts of the training chunks."""
    wheres: list[str] = []

    def texts():
        for chunk in train_chunks:
            wheres.extend(s.where for s in chunk)
            yield [prompt_text(s) for s in chunk]

    found = find_repeats([prompt_text(s) for s in val_samples], texts(), threshold=NEAR_THRESHOLD)
    exact = sum(r.exact for r in found.values())
    examples = [[val_samples[i].where, wheres[r.corpus_index], "exact" if r.exact else "near"]
                for i, r in sorted(found.items())[:EXAMPLES]]
    return Leakage(len(val_samples), exact, len(found) - exact, examples)


def act_on_leakage(leakage: Leakage | None, setting: str, source: str, warn) -> None:
    """val_leakage: 'error' raises, 'warn' calls warn(message), 'ignore' does nothing."""
    if leakage is None or not leakage.leaked or setting == "ignore":
        return
    if setting == "error":
        raise UserError(f"{source}: {leakage.describe()}; or set val_leakage: warn to train anyway")
    warn(f"{leakage.describe()}; set val_leakage: error to refuse such a split")
