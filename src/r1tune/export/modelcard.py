"""The model card (README.md) of an exported model, from what the run left in its output dir:
the saved run config (method, hyperparameters, data), eval_results.json (before/after training)
and eval/eval_report.json (r1tune eval), when present."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

HYPERPARAMETERS = ("finetuning_type", "lora_rank", "lora_alpha", "lora_target", "use_dora", "use_rslora", "pissa_init",
                   "quantization_bit", "learning_rate", "lr_scheduler_type", "num_train_epochs", "max_steps",
                   "per_device_train_batch_size", "gradient_accumulation_steps", "cutoff_len", "template", "seed")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (ValueError, OSError):
        return None


def model_card(run_dir: Path | None, base_model: str, license_name: str | None, adapters: list[str] = (),
               title: str | None = None) -> str:
    """The card of a finished run (run_dir), or of base + adapters exported without a run."""
    lines = ["---", f"license: {license_name or 'other'}", f"base_model: {base_model}",
             "library_name: transformers", "tags: [r1tune, fine-tuned]", "---", ""]
    lines += _run_lines(run_dir, base_model) if run_dir is not None else _adapter_lines(base_model, adapters, title)
    lines += ["", "## Intended use", "",
              "Describe the tasks and users this model is for, and the ones it is not for; "
              "it inherits the limitations and license terms of its base model.", ""]
    return "\n".join(lines)


def _run_lines(run_dir: Path, base_model: str) -> list[str]:
    run = yaml.safe_load((run_dir / "r1tune_config.yaml").read_text(encoding="utf-8")) \
        if (run_dir / "r1tune_config.yaml").is_file() else {}
    results, report = read_json(run_dir / "eval_results.json"), read_json(run_dir / "eval" / "eval_report.json")
    lines = [f"# {Path(run.get('output_dir', run_dir)).name}", "",
             f"Fine-tuned from `{base_model}` with r1tune ({run.get('finetuning_type', 'unknown method')}), "
             "merged into a plain transformers model.", "", "## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | `{run[k]}` |" for k in HYPERPARAMETERS if run.get(k) not in (None, False)]
    lines += ["", "## Data", "", f"- dataset: `{run.get('dataset', '?')}`"]
    if results:
        lines += [f"- trained tokens: {results.get('train_tokens', 0):,} over {results.get('global_step', 0)} steps"]
    return lines + _results_section(results, report)


def _adapter_lines(base_model: str, adapters: list[str], title: str | None) -> list[str]:
    if adapters:
        names = ", ".join(f"`{a}`" for a in adapters)
        what = f"`{base_model}` with the LoRA adapter(s) {names} merged in, in this order, by r1tune export."
    else:
        what = f"`{base_model}` re-saved by r1tune export (no adapter)."
    return [f"# {title or Path(base_model).name}", "", what, "", "## Data", "",
            "Exported without an r1tune run: the training data, hyperparameters and evaluation results "
            "are not known to this export; add them here."]


def _results_section(results: dict | None, report: dict | None) -> list[str]:
    lines = []
    if results and results.get("after"):
        lines += ["", "## Evaluation (held-out data, during training)", "", "| metric | before | after |", "|---|---|---|"]
        before = results.get("before") or {}
        lines += [f"| {k} | {_fmt(before.get(k))} | {_fmt(v)} |" for k, v in results["after"].items()]
    if report:
        lines += ["", "## Evaluation (`r1tune eval`)", "", "| metric | base | tuned |", "|---|---|---|"]
        base = report.get("base") or {}
        lines += [f"| {k} | {_fmt(base.get(k))} | {_fmt(v)} |" for k, v in report.get("tuned", {}).items()]
    return lines


def _fmt(value) -> str:
    return "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
