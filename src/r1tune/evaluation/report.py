"""The evaluation report: base vs tuned metrics, derived gains, threshold gates; JSON, Markdown, PNG.

Derived metrics compare the tuned model with the base on the same prompts:
`ppl_drop` = (base ppl − tuned ppl) / base ppl, and `<metric>_gain` = tuned − base for every
score in [0, 1] (bleu4_gain, rouge_l_gain, f1_macro_gain, accuracy_gain, ...). A threshold
names any metric of the tuned model or a derived one.
"""

from __future__ import annotations

import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path

from r1tune.errors import UserError
from r1tune.fileio import save_figure, write_text_atomic

OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
THRESHOLD = re.compile(r"\s*([A-Za-z_][\w]*)\s*(>=|<=|==|>|<)\s*(-?[\d.]+(?:e-?\d+)?)\s*")
SHORT = {"f1_gain": "f1_macro_gain"}  # the issue's and users' short names


@dataclass
class Gate:
    text: str
    metric: str
    op: str
    value: float
    actual: float | None = None

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
    if tuned.get("perplexity") and base.get("perplexity"):
        out["ppl_drop"] = (base["perplexity"] - tuned["perplexity"]) / base["perplexity"]
    for key, value in tuned.items():
        if key in base and _higher_is_better(key) and _is_score(value) and _is_score(base[key]):
            out[f"{key}_gain"] = value - base[key]
    return out


def _is_score(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def _higher_is_better(key: str) -> bool:
    return not key.endswith("_drop")  # robust_drop: the accuracy lost under perturbation


def judge(gates: list[Gate], tuned: dict, gains: dict, source: str = "config") -> list[Gate]:
    known = {**tuned, **gains}
    for gate in gates:
        if gate.metric not in known:
            names = ", ".join(sorted(k for k, v in known.items() if isinstance(v, (int, float))))
            raise UserError(f"{source}: eval_thresholds names '{gate.metric}', which this evaluation did not "
                            f"measure; measured: {names}")
        gate.actual = float(known[gate.metric])
    return gates


def write_report(folder: Path, tuned: dict, base: dict | None, gains: dict, gates: list[Gate]) -> dict[str, Path]:
    """eval_report.json, eval_report.md and eval_report.png in `folder`; returns their paths."""
    report = {"tuned": tuned, "base": base, "derived": gains,
              "thresholds": [{"gate": g.text, "actual": g.actual, "passed": g.passed} for g in gates],
              "passed": all(g.passed for g in gates)}
    paths = {"json": folder / "eval_report.json", "md": folder / "eval_report.md", "png": folder / "eval_report.png"}
    write_text_atomic(paths["json"], json.dumps(report, indent=2, ensure_ascii=False))
    write_text_atomic(paths["md"], markdown(tuned, base, gains, gates))
    if not plot(tuned, base, paths["png"]):
        paths.pop("png")
    return paths


def metric_rows(tuned: dict, base: dict | None) -> list[tuple[str, str, str]]:
    """(metric, base, tuned) for every numeric metric, formatted."""
    rows = []
    for key, value in tuned.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            other = (base or {}).get(key)
            rows.append((key, "-" if other is None else _fmt(other), _fmt(value)))
    return rows


def _fmt(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def markdown(tuned: dict, base: dict | None, gains: dict, gates: list[Gate]) -> str:
    lines = ["# Evaluation report", "", "| metric | base | tuned |", "|---|---:|---:|"]
    lines += [f"| {m} | {b} | {t} |" for m, b, t in metric_rows(tuned, base)]
    if gains:
        lines += ["", "| derived | value |", "|---|---:|"] + [f"| {k} | {v:+.4f} |" for k, v in gains.items()]
    if gates:
        lines += ["", "| threshold | actual | result |", "|---|---:|---|"]
        lines += [f"| `{g.text}` | {g.actual:.4f} | {'PASS' if g.passed else 'FAIL'} |" for g in gates]
    return "\n".join(lines) + "\n"


def plot(tuned: dict, base: dict | None, png: Path) -> Path | None:
    """Grouped bars of the [0, 1] scores (base vs tuned), perplexity in its own panel."""
    scores = [k for k, v in tuned.items() if _is_score(v) and _higher_is_better(k)]
    if not scores:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_ppl = "perplexity" in tuned
    fig, axes = plt.subplots(1, 2 if has_ppl else 1, figsize=(10 if has_ppl else 8, 4),
                             gridspec_kw={"width_ratios": [4, 1]} if has_ppl else None)
    ax = axes[0] if has_ppl else axes
    width = 0.4
    xs = range(len(scores))
    if base:
        ax.bar([x - width / 2 for x in xs], [base.get(k, 0.0) for k in scores], width, label="base", color="#bbbbbb")
    ax.bar([x + (width / 2 if base else 0) for x in xs], [tuned[k] for k in scores], width, label="tuned",
           color="#4c72b0")
    ax.set_xticks(list(xs), scores, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("scores (higher is better)")
    if has_ppl:
        names = (["base"] if base and "perplexity" in base else []) + ["tuned"]
        values = ([base["perplexity"]] if base and "perplexity" in base else []) + [tuned["perplexity"]]
        axes[1].bar(names, values, color=["#bbbbbb", "#4c72b0"][-len(names):])
        axes[1].set_yscale("log")
        axes[1].set_title("perplexity (lower)")
    fig.tight_layout()
    return save_figure(fig, png)
