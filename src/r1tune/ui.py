"""Terminal output: one rich console, progress bars, and the before/after table.

Output to a file or pipe is never wrapped or cut: rich would size it by the terminal on stdin /
stderr (or 80 columns) and wrap every line to that, splitting paths in logs. Here, when the
console's file is not a terminal, text is printed as is (rich's soft wrap); unless a width was set
(by argument or COLUMNS), tables render at their natural width and rules are 80 columns or as wide
as their title. In a terminal rich behaves as usual.
"""

from __future__ import annotations

from rich.console import Console as _RichConsole
from rich.console import ConsoleDimensions
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from r1tune.process import is_main

UNWRAPPED_WIDTH = 10_000  # the width of a file or pipe: more than any line we print
RULE_WIDTH = 80  # a rule fills the width, so it gets a fixed one in a file


class Console(_RichConsole):
    """rich's Console that never wraps or cuts output written to a file or pipe (see the module doc)."""

    @property
    def unbounded(self) -> bool:
        """True when writing to a file or pipe with no width set: lines go out whole."""
        return self._width is None and not self.is_terminal

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return ConsoleDimensions(UNWRAPPED_WIDTH, size.height) if self.unbounded else size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size

    def print(self, *objects, soft_wrap: bool | None = None, **options) -> None:
        if not is_main():  # one process of a multi-process run speaks for all
            return
        if soft_wrap is None and not self.is_terminal:  # text to a file is never wrapped, even with COLUMNS
            soft_wrap = True if self.soft_wrap else all(isinstance(o, (str, Text)) for o in objects)
        super().print(*objects, soft_wrap=soft_wrap, **options)

    def rule(self, title="", *, characters: str = "─", style="rule.line", align="center") -> None:
        from rich.rule import Rule

        width = None
        if self.unbounded:  # 80 columns, or wider so that the title (often a path) is never cut
            shown = self.render_str(title) if isinstance(title, str) else title
            width = max(RULE_WIDTH, shown.cell_len + 6)
        self.print(Rule(title=title, characters=characters, style=style, align=align), width=width)


console = Console(highlight=False)


def progress(items, desc: str, unit: str = "batch", total: int | None = None):
    """`items` wrapped in a tqdm bar on stderr, after one line on the console naming the phase and its size.

    The bar shows only in a terminal (tqdm's disable=None) and is cleared when done; the line is
    printed either way, so a log shows where the time goes. Printed lines do not break a bar
    that is already showing (an outer one, for nested phases).
    """
    from tqdm import tqdm

    total = len(items) if total is None else total
    with tqdm.external_write_mode():
        console.print(f"{desc}: {total} {unit if total == 1 else _plural(unit)}")
    return tqdm(items, desc=desc, total=total, unit=unit, leave=False, disable=None if is_main() else True,
                dynamic_ncols=True)


def say(line: str) -> None:
    """A line printed while a progress bar may be showing (it stays intact below the line)."""
    if is_main():
        from tqdm import tqdm

        tqdm.write(line)


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "ch", "sh", "x")) else "s")


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
    if "sample" in after:  # the first right and the first wrong held-out answer
        for question, expected, generated, right in after["sample"]:
            mark = "right" if right else "wrong"
            console.print(f"sample ({mark}): {question!r} → generated {generated!r} (expected {expected!r})")


def print_metric_comparison(before: dict | None, after: dict) -> None:
    """Every held-out metric before and after training, in one table."""
    if not after:
        return
    table = Table(title="before vs after training (held-out)")
    for name, justify in (("metric", "left"), ("before", "right"), ("after", "right")):
        table.add_column(name, justify=justify)
    for key, value in after.items():
        old = f"{before[key]:.4f}" if before and key in before else "-"
        table.add_row(key, old, f"{value:.4f}")
    console.print(table)


def warn(message: str) -> None:
    """A warning a person must not miss: bold yellow in a terminal, a 'warning:' line in a log."""
    console.print(f"[bold yellow]warning:[/bold yellow] {escape(message)}")
