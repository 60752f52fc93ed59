"""Every fine-tuning method side by side: trainable parameters, peak memory, speed and held-out loss.

    python bench/methods.py --markdown docs/img/methods_table.md   # the docs/methods.md table (about 26 minutes)
    python bench/methods.py --quick                                # smoke test: lora + prefix_tuning, 40 records
    python bench/methods.py --models qwen2-20M --methods lora dora --records 100

Each row is one `r1tune train` process, run one after another (never two at once: this machine
has 2 cores), on the 20M tiny models of bench/train_throughput.py (Qwen2: hidden 512, 6 layers;
DeepSeek-V3 with MoE and MLA: hidden 448, 6 layers). Every run trains one epoch over the same
synthetic skewed-length alpaca records (`write_records` of train_throughput.py, seed 0) with
template deepseek_r1, batch 8, cutoff 512, seed 0 and r1tune's defaults otherwise; the learning
rate depends on the method family (LoRA-like 2e-4, AdaLoRA 2e-3, full / freeze 5e-5, virtual
tokens 3e-2, bottleneck 1e-3, Lion 3e-5); it is not tuned per method, so the held-out loss shows
that each method trains, not which is best. LoRA rows use r=16, alpha=32 on `lora_target: all`.

Reported per row: trainable parameters and their share, parsed from r1tune's own line
`trainable params: X || all params: Y || trainable%: Z`; peak RSS summed over the process tree
(psutil, sampled every 0.1 s); non-padding tokens/s over the training loop (train_tokens /
train_runtime from output_dir/eval_results.json); the eval loss on 32 held-out records (the same
records for every run) after the epoch; and the wall time of the whole process (loading,
tokenizing, the evaluations before and after, saving). A method that fails shows its one-line
error instead of numbers; prefix tuning on DeepSeek-V3 is refused by r1tune (MLA caches a
compressed latent, not per-head keys and values) and shows "n/a (MLA)". r1tune counts 4-bit weights
unpacked and, with expert selection, only the selected experts' share of the fused tensors (or of
their LoRA) as trainable. Each run's log, config and output folder stay in the
work folder printed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from configs import write_config  # noqa: E402
from train_throughput import MODELS as ALL_MODELS  # noqa: E402
from train_throughput import measure, write_records  # noqa: E402

MODELS = {name: ALL_MODELS[name] for name in ("qwen2-20M", "deepseek_v3-20M")}
DEFAULT_RECORDS = 200  # 34 rows of ~50k tokens each: about 26 minutes on 2 idle cores
HELD_OUT = 32

LORA_LR, FULL_LR, PROMPT_LR, BOTTLENECK_LR, LION_LR = 2e-4, 5e-5, 3e-2, 1e-3, 3e-5
# AdaLoRA's singular values start at zero and its factors at std 0.02, so at LoRA's 2e-4 it barely moves
# in one short epoch (held-out loss 9.590 -> 9.587 on qwen2-20M); 10x is its usual range (5e-4 to 2e-3).
ADALORA_LR = 2e-3
LORA = {"finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_target": "all"}


@dataclass
class Method:
    name: str
    keys: dict
    lr: float
    archs: tuple[str, ...] = ("qwen2", "deepseek_v3")


METHODS = [
    Method("lora", LORA, LORA_LR),
    Method("dora", {**LORA, "use_dora": True}, LORA_LR),
    Method("rslora", {**LORA, "use_rslora": True}, LORA_LR),
    Method("pissa", {**LORA, "pissa_init": True}, LORA_LR),
    Method("loraplus", {**LORA, "loraplus_lr_ratio": 16}, LORA_LR),
    Method("qlora-4bit", {**LORA, "quantization_bit": 4, "quantization_type": "nf4", "double_quantization": True},
           LORA_LR),
    Method("qlora-8bit", {**LORA, "quantization_bit": 8}, LORA_LR),
    Method("adalora", {"finetuning_type": "adalora", "lora_target": "all", "adalora_init_r": 16,
                       "adalora_target_r": 8, "lora_alpha": 32}, ADALORA_LR),
    Method("prompt_tuning", {"finetuning_type": "prompt_tuning"}, PROMPT_LR),
    Method("prefix_tuning", {"finetuning_type": "prefix_tuning"}, PROMPT_LR),  # refused on MLA: n/a
    Method("p_tuning", {"finetuning_type": "p_tuning"}, PROMPT_LR),
    Method("bottleneck", {"finetuning_type": "bottleneck"}, BOTTLENECK_LR),
    Method("freeze", {"finetuning_type": "freeze", "freeze_trainable_layers": 2}, FULL_LR),
    Method("full", {"finetuning_type": "full"}, FULL_LR),
    Method("lora-top2-experts", {**LORA, "expert_top_k": 2}, LORA_LR, ("deepseek_v3",)),
    Method("full-top2-experts", {"finetuning_type": "full", "expert_top_k": 2}, FULL_LR, ("deepseek_v3",)),
    Method("lora+lion_32bit", {**LORA, "optim": "lion_32bit"}, LION_LR, ("qwen2",)),
    Method("lora+adamw_8bit", {**LORA, "optim": "adamw_8bit"}, LORA_LR, ("qwen2",)),
    Method("lora+adafactor", {**LORA, "optim": "adafactor"}, LORA_LR, ("qwen2",)),
    Method("lora+adamw_torch_fused", {**LORA, "optim": "adamw_torch_fused"}, LORA_LR, ("qwen2",)),
]
BY_NAME = {m.name: m for m in METHODS}
QUICK_METHODS, QUICK_RECORDS = ["lora", "prefix_tuning"], 40
COLUMNS = ["model", "method", "trainable params", "trainable %", "peak RSS (GB)", "tokens/s", "held-out loss",
           "wall time"]
TRAINABLE = re.compile(r"trainable params:\s*([\d,]+)\s*\|\|\s*all params:\s*([\d,]+)\s*\|\|\s*trainable%:\s*([\d.]+)")


@dataclass
class Row:
    model: str
    method: str
    cells: list[str] = field(default_factory=list)  # the columns after model and method


def run_keys(work: Path, model: Path, data: Path, held_out: Path, out: Path, method: Method) -> dict:
    """The run file of one method: shared settings, then the method's own keys."""
    return {"model_name_or_path": str(model), "dataset": str(data), "eval_dataset": str(held_out),
            "output_dir": str(out), "template": "deepseek_r1", "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 8, "cutoff_len": 512, "num_train_epochs": 1, "seed": 0,
            "learning_rate": method.lr, "logging_steps": 5, "save_steps": 100000, "report_to": "none",
            "plot_loss": False, "data_cache_dir": str(work / "cache"), "overwrite_output_dir": True, **method.keys}


def one_line_error(exc: Exception) -> str:
    """r1tune's `error: ...` line, else the last line of the traceback (or of the exception)."""
    text = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    text = errors[-1].removeprefix("error: ") if errors else (lines[-1] if lines else "failed")
    return text if len(text) <= 160 else text[:157] + "..."


def train_once(work: Path, model: Path, data: Path, held_out: Path, label: str, method: Method) -> list[str]:
    """One `r1tune train` process; the row's cells after model and method."""
    out = work / label
    config = write_config(work / f"{label}.yaml", run_keys(work, model, data, held_out, out, method))
    env = {**os.environ, "COLUMNS": "250"}  # rich must not wrap the trainable-params line
    start = time.perf_counter()
    try:
        text, rss = measure([sys.executable, "-m", "r1tune", "train", str(config)], env=env)
    except RuntimeError as exc:
        (work / f"{label}.log").write_text(str(exc), encoding="utf-8")
        raise
    wall = time.perf_counter() - start
    (work / f"{label}.log").write_text(text, encoding="utf-8")
    trainable, _, share = TRAINABLE.search(text).groups()
    result = json.loads((out / "eval_results.json").read_text())
    loss = (result.get("after") or {}).get("eval_loss")
    speed = result["train_tokens"] / result["train_runtime"]
    return [trainable, f"{float(share):.3f} %", f"{rss:.2f}", f"{speed:,.0f}", "-" if loss is None else f"{loss:.3f}",
            f"{wall:.0f} s"]


def run_row(work: Path, model_name: str, model: Path, data: Path, held_out: Path, method: Method) -> Row:
    """A row of numbers, or of the failure: 'n/a (MLA)' for prefix tuning on DeepSeek-V3, else the error."""
    label = f"{model_name}-{re.sub(r'[^a-z0-9_.-]+', '_', method.name)}"
    try:
        cells = train_once(work, model, data, held_out, label, method)
    except Exception as exc:  # noqa: BLE001 - a failing method is a row, not the end of the bench
        message = one_line_error(exc)
        note = "n/a (MLA)" if method.name == "prefix_tuning" and "(MLA)" in message else f"failed: {message}"
        cells = [note] + ["-"] * (len(COLUMNS) - 3)
    return Row(model_name, method.name, cells)


def how_measured(records: int) -> str:
    return (f"Measured {datetime.date.today().isoformat()} with torch {version('torch')}, transformers "
            f"{version('transformers')}, peft {version('peft')} on {os.cpu_count()} CPU cores: {records} records, "
            f"1 epoch, batch 8, cutoff 512, seed 0, held-out loss on {HELD_OUT} other records; "
            f"`{shlex.join(['python', 'bench/methods.py', *sys.argv[1:]])}`.")


def print_table(rows: list[Row], note: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="r1tune fine-tuning methods")
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(row.model, row.method, *row.cells)
    console = Console()
    if not console.is_terminal:  # a log file: no need to squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)
    console.print(note, highlight=False)


def markdown(rows: list[Row], note: str) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * 2 + "---:|" * (len(COLUMNS) - 2)]
    for row in rows:
        cells = [cell.replace("|", "\\|").replace("\n", " ") for cell in [row.model, row.method, *row.cells]]
        lines.append("| " + " | ".join(cells) + " |")
    return note + "\n\n" + "\n".join(lines) + "\n"


def warn_if_busy() -> None:
    busy = psutil.cpu_percent(interval=2.0)
    if busy > 20:
        print(f"warning: the CPU is {busy:.0f}% busy before the first run: something else is running, so tokens/s and "
              "wall times will be low and noisy", flush=True)


def plan(models: list[str], methods: list[str]) -> list[tuple[str, Method]]:
    """(model, method) pairs in run order, skipping methods that do not apply to a model's architecture."""
    return [(name, BY_NAME[m]) for name in models for m in methods if MODELS[name][0] in BY_NAME[m].archs]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=None, help=f"training records (default {DEFAULT_RECORDS}; "
                        f"--quick: {QUICK_RECORDS})")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=None, choices=list(BY_NAME), metavar="METHOD",
                        help="default: all of " + ", ".join(BY_NAME))
    parser.add_argument("--markdown", type=Path,
                        help="also write the Markdown table here (e.g. docs/img/methods_table.md)")
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {' + '.join(QUICK_METHODS)}, "
                        f"{QUICK_RECORDS} records")
    return parser.parse_args()


def prepare(work: Path, records: int, model_names: list[str]) -> tuple[Path, Path, dict[str, Path]]:
    """Training and held-out records, and each tiny model, written once into `work`."""
    from transformers.utils import logging

    from r1tune.models.tiny import build_tiny

    logging.disable_progress_bar()
    data, held_out = work / "records.jsonl", work / "held_out.jsonl"
    write_records(data, records)
    write_records(held_out, HELD_OUT, seed=1)  # the same held-out records score every run
    models = {name: build_tiny(work / name, MODELS[name][0], hidden_size=MODELS[name][1], num_layers=MODELS[name][2])
              for name in model_names}
    return data, held_out, models


def report(rows: list[Row], records: int, work: Path, markdown_path: Path | None) -> None:
    note = how_measured(records)
    print_table(rows, note)
    table = markdown(rows, note)
    for path in [work / "methods_table.md", *([markdown_path] if markdown_path else [])]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table, encoding="utf-8")


def main() -> int:
    args = parse_args()
    warn_if_busy()
    records = args.records or (QUICK_RECORDS if args.quick else DEFAULT_RECORDS)
    runs = plan(args.models, args.methods or (QUICK_METHODS if args.quick else list(BY_NAME)))
    work = Path(tempfile.mkdtemp(prefix="r1tune-methods-bench-"))
    data, held_out, models = prepare(work, records, args.models)
    rows, start = [], time.perf_counter()
    for i, (name, method) in enumerate(runs, 1):
        rows.append(run_row(work, name, models[name], data, held_out, method))
        print(f"[{i}/{len(runs)}] {name} {method.name}: {' | '.join(rows[-1].cells)}", flush=True)
    report(rows, records, work, args.markdown)
    print(f"{len(runs)} runs in {(time.perf_counter() - start) / 60:.1f} min; Markdown table, logs and run folders "
          f"in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
