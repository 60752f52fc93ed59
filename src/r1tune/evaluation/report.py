"""The evaluation report: base vs tuned metrics, derived gains, threshold gates; JSON, Markdown, PNG.

Derived metrics compare the tuned model with the base on the same prompts:
`ppl_drop` = (base ppl − tuned ppl) / base ppl, and `<metric>_gain` = tuned − base for every
score in [0, 1] (bleu4_gain, rouge_l_gain, f1_macro_gain, accuracy_gain, ...). A threshold
names any metric of the tuned model or a derived one.

A metric that does not apply to the data (`metrics.NotApplicable`; a gain or ppl_drop of one)
shows as "n/a (reason)" in the terminal, Markdown and PNG, and as null in the JSON, with the
reason under "not_applicable". A threshold on it FAILs with that reason: the data cannot show
the gate holds, so it must not pass, and the report is still written.
"""

from __future__ import annotations

import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path

from r1tune.errors import UserError
from r1tune.data.metrics import NotApplicable
from r1tune.fileio import save_figure, write_text_atomic

OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
THRESHOLD = re.compile(r"\s*([A-Za-z_][\w/]*)\s*(>=|<=|==|>|<)\s*(-?[\d.]+(?:e-?\d+)?)\s*")  # rewards/margins
SHORT = {"f1_gain": "f1_macro_gain"}  # the issue's and users' short names
# not [0, 1] scores, even when their value falls in [0, 1]
UNBOUNDED = ("perplexity", "reasoning_tokens", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/mean")


@dataclass
class Gate:
    text: str
    metric: str
    op: str
    value: float
    actual: float | None = None
    reason: str | None = None  # why the metric is n/a (actual is then None and the gate fails)

    @property
    def passed(self) -> bool:
        return self.actual is not None and OPERATORS[self.op](self.actual, self.value)


def parse_thresholds(items: list[str] | None, source: str = "config") -> list[Gate]:
    gates = []
    for text in items or []:
        m = THRESHOLD.fullmatch(str(text))
        if not m:
            raise UserError(f"{source}: eval_thresholds entry '{text}' is not 'metric >= number' "
                            "(operators >=, <=, >, <, ==); e.g. 'bleu4 >= 0.45'")
        gates.append(Gate(str(text).strip(), SHORT.get(m.group(1), m.group(1)), m.group(2), float(m.group(3))))
    return gates


def derived(tuned: dict, base: dict | None) -> dict:
    """ppl_drop and <metric>_gain of tuned over base (empty without a base)."""
    if not base:
        return {}
    out = {}
    ppl, base_ppl = tuned.get("perplexity"), base.get("perplexity")
    if _na(ppl) or _na(base_ppl):
        out["ppl_drop"] = ppl if _na(ppl) else base_ppl
    elif ppl and base_ppl:
        out["ppl_drop"] = (base_ppl - ppl) / base_ppl
    for key, value in tuned.items():
        other = base.get(key)
        if key in UNBOUNDED or not _higher_is_better(key) or not (_score_or_na(value) and _score_or_na(other)):
            continue
        out[f"{key}_gain"] = value if _na(value) else other if _na(other) else value - other
    return out


def _is_score(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def _na(value) -> bool:
    return isinstance(value, NotApplicable)


def _score_or_na(value) -> bool:
    return _is_score(value) or _na(value)


def _higher_is_better(key: str) -> bool:
    return not key.endswith("_drop")  # robust_drop: the accuracy lost under perturbation


def judge(gates: list[Gate], tuned: dict, gains: dict, source: str = "config") -> list[Gate]:
    known = {**tuned, **gains}
    for gate in gates:
        if gate.metric not in known:
            names = ", ".join(sorted(k for k, v in known.items() if isinstance(v, (int, float)) or _na(v)))
            raise UserError(f"{source}: eval_thresholds names '{gate.metric}', which this evaluation did not "
                            f"measure; measured: {names}")
        value = known[gate.metric]
        gate.actual, gate.reason = (None, value.reason) if _na(value) else (float(value), None)
    return gates


def gate_actual(gate: Gate) -> str:
    """The measured value as shown beside a gate: "actual 0.4500", or why the metric is n/a."""
    if gate.reason is not None:
        return f"{gate.metric} is n/a: {gate.reason}; a threshold on it fails"
    return f"actual {gate.actual:.4f}"


def format_gain(value) -> str:
    return str(value) if _na(value) else f"{value:+.4f}"


def write_report(folder: Path, tuned: dict, base: dict | None, gains: dict, gates: list[Gate]) -> dict[str, Path]:
    """eval_report.json, eval_report.md and eval_report.png in `folder`; returns their paths."""
    report = {"tuned": _numbers(tuned), "base": _numbers(base), "derived": _numbers(gains),
              "not_applicable": {"tuned": _reasons(tuned), "base": _reasons(base), "derived": _reasons(gains)},
              "thresholds": [{"gate": g.text, "actual": g.actual, "passed": g.passed, "reason": g.reason}
                             for g in gates],
              "passed": all(g.passed for g in gates)}
    paths = {"json": folder / "eval_report.json", "md": folder / "eval_report.md", "png": folder / "eval_report.png"}
    write_text_atomic(paths["json"], json.dumps(report, indent=2, ensure_ascii=False))
    write_text_atomic(paths["md"], markdown(tuned, base, gains, gates))
    if not plot(tuned, base, paths["png"]):
        paths.pop("png")
    return paths


def _numbers(scores: dict | None) -> dict | None:
    """The scores for JSON: n/a metrics as null."""
    return None if scores is None else {k: None if _na(v) else v for k, v in scores.items()}


def _reasons(scores: dict | None) -> dict:
    """metric -> why it is n/a, for the metrics that are."""
    return {k: v.reason for k, v in (scores or {}).items() if _na(v)}


def metric_rows(tuned: dict, base: dict | None) -> list[tuple[str, str, str]]:
    """(metric, base, tuned) for every numeric or n/a metric, formatted ("n/a (reason)" for n/a)."""
    rows = []
    for key, value in tuned.items():
        if _na(value) or isinstance(value, (int, float)) and not isinstance(value, bool):
            other = (base or {}).get(key)
            rows.append((key, "-" if other is None else _fmt(other), _fmt(value)))
    return rows


def _fmt(value) -> str:
    if _na(value):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def markdown(tuned: dict, base: dict | None, gains: dict, gates: list[Gate]) -> str:
    lines = ["# Evaluation report", "", "| metric | base | tuned |", "|---|---:|---:|"]
    lines += [f"| {m} | {b} | {t} |" for m, b, t in metric_rows(tuned, base)]
    if gains:
        lines += ["", "| derived | value |", "|---|---:|"] + [f"| {k} | {format_gain(v)} |" for k, v in gains.items()]
    if gates:
        lines += ["", "| threshold | actual | result |", "|---|---:|---|"]
        lines += [f"| `{g.text}` | {f'n/a ({g.reason})' if g.reason else f'{g.actual:.4f}'} | "
                  f"{'PASS' if g.passed else 'FAIL'} |" for g in gates]
    return "\n".join(lines) + "\n"


def plot(tuned: dict, base: dict | None, png: Path) -> Path | None:
    """Grouped bars of the [0, 1] scores (base vs tuned), perplexity in its own panel; an n/a metric
    gets no bar but "n/a" in its place and its reason in a note under the chart."""
    scores = [k for k, v in tuned.items() if k not in UNBOUNDED and _score_or_na(v) and _higher_is_better(k)]
    if not scores:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bar_value(value) -> float:
        return value if isinstance(value, (int, float)) else float("nan")  # n/a or missing: no bar

    has_ppl = "perplexity" in tuned
    fig, axes = plt.subplots(1, 2 if has_ppl else 1, figsize=(10 if has_ppl else 8, 4),
                             gridspec_kw={"width_ratios": [4, 1]} if has_ppl else None)
    ax = axes[0] if has_ppl else axes
    width = 0.4
    xs = range(len(scores))
    if base:
        ax.bar([x - width / 2 for x in xs], [bar_value(base.get(k)) for k in scores], width, label="base",
               color="#bbbbbb")
    ax.bar([x + (width / 2 if base else 0) for x in xs], [bar_value(tuned[k]) for k in scores], width, label="tuned",
           color="#4c72b0")
    for x, key in zip(xs, scores):
        if _na(tuned[key]):
            ax.text(x, 0.03, f"n/a: {tuned[key].reason}", rotation=90, ha="center", va="bottom", fontsize=8,
                    color="#555555")
    ax.set_xticks(list(xs), [f"{k} (n/a)" if _na(tuned[k]) else k for k in scores], rotation=30, ha="right",
                  fontsize=8)
    ax.set_xlim(-0.6, len(scores) - 0.4)  # a slot without bars (n/a) keeps its width
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("scores (higher is better)")
    if has_ppl:
        names = (["base"] if base and "perplexity" in base else []) + ["tuned"]
        values = ([base["perplexity"]] if base and "perplexity" in base else []) + [tuned["perplexity"]]
        axes[1].bar(names, [bar_value(v) for v in values], color=["#bbbbbb", "#4c72b0"][-len(names):])
        for i, value in enumerate(values):
            if _na(value):
                axes[1].text(i, 0.5, "n/a", ha="center", transform=axes[1].get_xaxis_transform(), fontsize=8)
        if any(not _na(v) for v in values):
            axes[1].set_yscale("log")
        else:
            axes[1].set_yticks([])
        axes[1].set_title("perplexity (lower)")
    notes = [f"{k}: n/a ({v.reason})" for k, v in tuned.items() if _na(v) and (k in scores or k == "perplexity")]
    fig.tight_layout(rect=(0, 0.045 * len(notes), 1, 1))
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=8, color="#555555", ha="left", va="bottom")
    return save_figure(fig, png)
