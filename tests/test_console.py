"""Console output to a file or pipe is never wrapped or cut; progress bars and phase lines."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from rich.table import Table

from r1tune import ui
from r1tune.ui import Console

LONG_PATH = "/tmp/" + "a_rather_long_folder_name/" * 4 + "training_loss.png"  # 126 characters


@pytest.fixture()
def narrow_terminal(monkeypatch):
    """A 40-column terminal on stdin/stderr while stdout goes elsewhere: rich would size a file by it."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((40, 24)))


def _table() -> Table:
    table = Table(title="evaluation")
    table.add_column("metric")
    table.add_column("tuned", justify="right")
    table.add_row("bleu4", "n/a (references under 4 tokens)")
    table.add_row("a_metric_with_a_rather_long_name", "0.5000")
    return table


def test_a_file_gets_whole_lines_and_natural_width_tables(narrow_terminal):
    out = io.StringIO()
    console = Console(file=out, highlight=False)
    console.print(f"loss curve: {LONG_PATH}")
    console.print(_table())
    console.rule(f"{LONG_PATH} line 3 (conversation)")
    console.rule("short")
    lines = out.getvalue().splitlines()
    assert lines[0] == f"loss curve: {LONG_PATH}"
    table = lines[1:8]
    assert len({len(line.rstrip()) for line in table[1:]}) == 1  # every row one line, the table's own width
    assert 40 < len(table[1]) < 80 and "evaluation" in table[0]
    assert any("n/a (references under 4 tokens)" in line for line in table)
    assert f"{LONG_PATH} line 3 (conversation)" in lines[8]  # a rule's title is not cut
    assert len(lines[9]) == ui.RULE_WIDTH and "short" in lines[9]  # nor does a rule fill 10,000 columns


def test_a_terminal_still_wraps_and_columns_bounds_tables_only(monkeypatch):
    out = io.StringIO()
    Console(file=out, force_terminal=True, width=40, color_system=None).print(f"loss curve: {LONG_PATH}")
    assert len(out.getvalue().splitlines()) > 1  # rich's usual wrapping in a terminal
    monkeypatch.setenv("COLUMNS", "60")
    out = io.StringIO()
    console = Console(file=out, highlight=False)
    console.print(f"loss curve: {LONG_PATH}")
    console.print(_table())
    lines = out.getvalue().splitlines()
    assert lines[0] == f"loss curve: {LONG_PATH}"  # text to a file is never wrapped
    assert max(len(line) for line in lines[1:]) <= 60  # an explicit COLUMNS still sizes tables


def test_the_shared_console_follows_a_captured_stdout(narrow_terminal, monkeypatch, capsys):
    monkeypatch.setattr(ui.console, "_width", None)  # as if COLUMNS was unset when r1tune.ui was imported
    ui.console.print(f"report: {LONG_PATH}, {LONG_PATH}")
    ui.console.print(_table())
    from tqdm import tqdm

    tqdm.write(f"update heatmap: {LONG_PATH}")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"report: {LONG_PATH}, {LONG_PATH}"
    assert lines[-1] == f"update heatmap: {LONG_PATH}"
    assert any(line.startswith("│ a_metric_with_a_rather_long_name │") for line in lines)


def test_cli_output_to_a_pipe_beside_a_narrow_terminal(tiny_qwen, parity_file, tmp_path):
    """`r1tune data stats` piped, with a 40-column terminal on stdin: path and table lines come out whole."""
    pty, fcntl, termios, struct = (pytest.importorskip(m) for m in ("pty", "fcntl", "termios", "struct"))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model_name_or_path": str(tiny_qwen), "dataset": str(parity_file),
                                  "output_dir": str(tmp_path / "out"), "cutoff_len": 96}), encoding="utf-8")
    plot = tmp_path / ("a_rather_long_folder_name/" * 4) / "data_lengths.png"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    try:
        proc = subprocess.run([sys.executable, "-m", "r1tune", "data", "stats", str(config), "--plot", str(plot)],
                              stdin=slave, capture_output=True, text=True, env=env, timeout=120)
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"length histogram: {plot}" in lines and len(str(plot)) > 80
    rows = [line for line in lines if line.startswith("│")]
    assert any(line.startswith("│ dropped at cutoff_len (no answer left) │") for line in rows)
    assert len({len(line) for line in rows}) == 1 and len(rows[0]) > 40  # natural width, not the terminal's 40


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_prints_a_phase_line_and_a_bar_only_in_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(ui.console, "_width", None)
    assert list(ui.progress(range(3), "tuned perplexity")) == [0, 1, 2]
    assert list(ui.progress(["typos"], "tuned robustness", unit="kind")) == ["typos"]
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["tuned perplexity: 3 batches", "tuned robustness: 1 kind"]
    assert captured.err == ""  # stderr is not a terminal here: no bar
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert list(ui.progress(range(2), "tuned generation")) == [0, 1]
    assert "tuned generation:   0%|" in tty.getvalue() and "0/2" in tty.getvalue()  # drawn, then cleared
    assert capsys.readouterr().out == "tuned generation: 2 batches\n"
