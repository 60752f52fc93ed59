"""`r1tune data stats`: what is in a run's data, and what deserves a warning.

Counts per kind, token lengths (untruncated) with a histogram PNG, how many samples
cutoff_len truncates or drops, exact and near duplicates, empty answers, label
balance and the negative share for classification / KTO data. Warnings follow
common fine-tuning advice: fewer than 5,000 samples, negatives outside 15-20 %,
and a length spread (p95 - p5 token length) above twice the mean.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from r1tune.data.dedup import find_duplicates
from r1tune.data.reasoning import split_reasoning
from r1tune.data.kinds import Sample
from r1tune.data.leakage import prompt_text

MIN_SAMPLES = 5000
NEGATIVE_RANGE = (0.15, 0.20)
NEGATIVE_LABELS = {"0", "false", "no", "neg", "negative", "bad", "reject", "rejected"}
PERCENTILES = (5, 10, 50, 90, 95, 99)


@dataclass
class DataStats:
    kinds: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    cutoff_len: int = 0
    over_cutoff: int = 0
    dropped_at_cutoff: int = 0
    empty_answers: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    repeated_prompts: int = 0  # prompts equal or near an earlier record's prompt (what a split can leak)
    labels: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)
    rows: dict[str, list[int]] = field(default_factory=dict)  # preference pairs: untruncated tokens of each row

    @property
    def count(self) -> int:
        return sum(self.kinds.values())

    def length_summary(self, lengths: list[int] | None = None) -> dict[str, float]:
        """min, mean, max, percentiles and spread of `lengths` (default: every record's)."""
        arr = np.asarray((self.lengths if lengths is None else lengths) or [0])
        summary = {"min": int(arr.min()), "mean": float(arr.mean()), "max": int(arr.max())}
        summary.update({f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES})
        summary["spread"] = summary["p95"] - summary["p5"]
        return summary

    def negative_share(self) -> float | None:
        negatives = sum(n for label, n in self.labels.items() if label.lower() in NEGATIVE_LABELS)
        return negatives / sum(self.labels.values()) if negatives and self.labels else None

    def as_dict(self) -> dict:
        return {"records": self.count, "kinds": dict(self.kinds), "tokens": self.length_summary(),
                "cutoff_len": self.cutoff_len, "over_cutoff": self.over_cutoff,
                "dropped_at_cutoff": self.dropped_at_cutoff, "empty_answers": self.empty_answers,
                "exact_duplicates": self.exact_duplicates, "near_duplicates": self.near_duplicates,
                "repeated_prompts": self.repeated_prompts, "pairs": self.kinds["preference"],
                "rows": {view: self.length_summary(lengths) for view, lengths in self.rows.items()},
                "labels": dict(self.labels), "negative_share": self.negative_share(),
                "skipped": dict(self.skipped), "warnings": self.warnings}


def sample_text(sample: Sample) -> str:
    """The text a duplicate check compares: prompt and answer(s)."""
    parts = [m.get("content", "") for m in sample.messages] + [sample.text, sample.chosen, sample.rejected]
    return "\n".join(p for p in parts if p)


def has_empty_answer(sample: Sample) -> bool:
    if sample.kind == "preference":
        return not split_reasoning(sample.chosen)[1] or not split_reasoning(sample.rejected)[1]
    if sample.kind == "text" or not sample.messages:
        return not sample.text.strip()
    last = sample.messages[-1]
    return not last.get("tool_calls") and not split_reasoning(last.get("content", ""))[1]


def collect_stats(samples: list[Sample], lengths: list[int], target_counts: list[int], cutoff_len: int,
                  skipped_reasons: list[str] = (), near_threshold: float = 0.8,
                  rows: dict[str, list[int]] | None = None) -> DataStats:
    """Statistics of `samples` whose full token lengths and trained-token counts within cutoff_len are given
    (a pair's length is its longer row; `rows`: each pair's chosen and rejected lengths)."""
    stats = DataStats(cutoff_len=cutoff_len, lengths=list(lengths), skipped=Counter(skipped_reasons),
                      rows={view: list(n) for view, n in (rows or {}).items()})
    stats.kinds = Counter(s.kind for s in samples)
    stats.over_cutoff = sum(n > cutoff_len for n in lengths)
    stats.dropped_at_cutoff = sum(t == 0 for t in target_counts)
    stats.empty_answers = sum(has_empty_answer(s) for s in samples)
    stats.labels = Counter(s.label for s in samples if s.label is not None)
    duplicates = find_duplicates([sample_text(s) for s in samples], threshold=near_threshold)
    stats.exact_duplicates, stats.near_duplicates = duplicates.exact_duplicates, duplicates.near_duplicates
    prompts = find_duplicates([prompt_text(s) for s in samples], threshold=near_threshold)
    stats.repeated_prompts = len(prompts.repeats())
    stats.warnings = warnings_for(stats)
    return stats


def warnings_for(stats: DataStats) -> list[str]:
    out = []
    if stats.count < MIN_SAMPLES:
        out.append(f"only {stats.count:,} samples: fine-tuning usually needs at least {MIN_SAMPLES:,} "
                   "for a stable gain; watch the eval loss for overfitting")
    negative = stats.negative_share()
    if negative is not None and not NEGATIVE_RANGE[0] <= negative <= NEGATIVE_RANGE[1]:
        out.append(f"negative labels are {negative:.1%} of the labelled samples (advised: 15-20%); "
                   "rebalance the data or set balance_classes: true")
    summary = stats.length_summary()
    if summary["spread"] > 2 * summary["mean"]:
        out.append(f"token lengths spread widely (p95-p5 = {summary['spread']:.0f} > 2 x mean {summary['mean']:.0f}): "
                   "set group_by_length or packing to avoid padding")
    if stats.over_cutoff:
        out.append(f"{stats.over_cutoff:,} samples are longer than cutoff_len {stats.cutoff_len} "
                   "(truncated, or chunked with long_samples: chunk)")
    if stats.exact_duplicates or stats.near_duplicates:
        out.append(f"{stats.exact_duplicates:,} exact and {stats.near_duplicates:,} near duplicates (whole samples, "
                   "reasoning included): repeated content weighs more in training")
    if stats.repeated_prompts:
        out.append(f"{stats.repeated_prompts:,} prompts repeat an earlier prompt exactly or nearly: a validation "
                   "split can hold prompts training also has (r1tune train and data check report it; val_leakage)")
    if stats.empty_answers:
        out.append(f"{stats.empty_answers:,} samples have an empty answer (after any reasoning)")
    return out


def plot_lengths(lengths: list[int], cutoff_len: int, path) -> None:
    """Histogram of token lengths with the cutoff marked, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from r1tune.fileio import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=min(60, max(10, len(set(lengths)))), color="#4c72b0")
    ax.axvline(cutoff_len, color="#c44e52", linestyle="--", label=f"cutoff_len {cutoff_len}")
    ax.set_xlabel("tokens per sample (untruncated)")
    ax.set_ylabel("samples")
    ax.set_title(f"token lengths of {len(lengths):,} samples")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
