"""Terminal output: one rich console and the before/after table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console(highlight=False)


def print_comparison(before: dict | None, after: dict) -> None:
    """Table of eval loss / perplexity / exact match before and after training."""
    rows = [("eval loss", "eval_loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"),
            ("exact match", "exact_match", "{:.1%}")]
    table = Table(title="before vs after training")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    shown = False
    for label, key, fmt in rows:
        if key in after:
            old = fmt.format(before[key]) if before and key in before else "-"
            table.add_row(label, old, fmt.format(after[key]))
            shown = True
    if shown:
        console.print(table)
    if "sample" in after:
        question, expected, generated = after["sample"]
        console.print(f"sample: {question!r} → generated {generated!r} (expected {expected!r})")
