"""`r1tune data stats` and `r1tune data preview`: look at a run's data before training on it."""

from __future__ import annotations

import json

from rich.table import Table
from rich.text import Text

from r1tune.data.dataset import DataReport, encode_sample, fit_to_window, load_samples
from r1tune.data.encode import IGNORE, Example, PairExample
from r1tune.data.kinds import Sample
from r1tune.data.stats import DataStats, collect_stats, plot_lengths
from r1tune.stages import stage_data
from r1tune.ui import console


def read_all(cfg) -> tuple[list[Sample], list[str]]:
    """Every record of `dataset` (and `eval_dataset`) of any kind, with the reasons of skipped ones."""
    report = DataReport()
    skipped = report.skipped if cfg.on_bad_record == "skip" else None
    # a stage that reads every record as one kind (pt: text; dpo and rm: pairs; kto: tagged answers) shows
    # them as it trains on them, and stops at a bad record as training does; sft shows every kind as itself
    stage = stage_data(cfg.stage)
    common = dict(skipped=skipped, seed=cfg.seed, stage=cfg.stage if stage.reads_text or stage.reads_one_kind else None)
    samples = load_samples(cfg.dataset, cfg.dataset_dir, cfg.max_samples, mix_strategy=cfg.mix_strategy,
                           interleave_probs=cfg.interleave_probs, **common)
    if cfg.eval_dataset:
        samples += load_samples(cfg.eval_dataset, cfg.dataset_dir, cfg.max_samples, key="eval_dataset", **common)
    return samples, [s.reason for s in report.skipped]


def encoded_views(tokenizer, sample: Sample, empty_think: str) -> dict[str, Example]:
    """The untruncated rows of a sample as its stage encodes them: 'chosen' and 'rejected' for a preference
    pair (the final answer trained), 'answer' for a KTO record (its kto_tag is the sample's label), else one."""
    return _views(sample, encode_sample(tokenizer, sample, empty_think))


def _views(sample: Sample, example: Example | PairExample) -> dict[str, Example]:
    if isinstance(example, PairExample):
        return {"chosen": example.chosen, "rejected": example.rejected}
    return {"answer" if sample.kind == "kto" else "sample": example}


def compute_stats(cfg, tokenizer) -> DataStats:
    """Lengths are untruncated tokens per record (a pair: its longer row, which cutoff_len and batching
    see), per-row lengths of pairs under 'chosen' and 'rejected', trained tokens within cutoff_len."""
    samples, skipped = read_all(cfg)
    lengths, targets, rows, report = [], [], {}, DataReport()
    for sample in samples:
        example = encode_sample(tokenizer, sample, cfg.empty_think)
        views = _views(sample, example)
        lengths.append(max(len(row.input_ids) for row in views.values()))
        if isinstance(example, PairExample):
            for name, row in views.items():
                rows.setdefault(name, []).append(len(row.input_ids))
        targets.append(sum(p.num_targets for p in fit_to_window(example, cfg, report)))
    return collect_stats(samples, lengths, targets, cfg.cutoff_len, skipped, rows=rows)


def print_stats(stats: DataStats) -> None:
    table = Table(title=f"data: {stats.count:,} records")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for kind, n in stats.kinds.most_common():
        table.add_row(f"records: {kind}", f"{n:,}")
    summary = stats.length_summary()
    for key in ("min", "p10", "p50", "mean", "p90", "p99", "max"):
        table.add_row(f"tokens {key}", f"{summary[key]:,.0f}")
    rows = [("longer than cutoff_len", stats.over_cutoff), ("dropped at cutoff_len (no answer left)", stats.dropped_at_cutoff),
            ("exact duplicates", stats.exact_duplicates), ("near duplicates", stats.near_duplicates),
            ("repeated prompts", stats.repeated_prompts),
            ("empty answers", stats.empty_answers)]
    for label, n in rows:
        table.add_row(label, f"{n:,}")
    if stats.kinds["preference"]:
        table.add_row("pairs (chosen + rejected rows)", f"{stats.kinds['preference']:,}")
    for view, lengths in stats.rows.items():
        row = stats.length_summary(lengths)
        table.add_row(f"{view} row tokens p50 / mean / max", f"{row['p50']:,.0f} / {row['mean']:,.0f} / {row['max']:,}")
    for label, n in stats.labels.most_common():
        name = f"kto_tag {label} ({'desirable' if label == 'true' else 'undesirable'})" \
            if stats.kinds["kto"] and label in ("true", "false") else f"label {label!r}"
        table.add_row(name, f"{n:,} ({n / sum(stats.labels.values()):.1%})")
    if (share := stats.negative_share()) is not None:
        table.add_row("negative share", f"{share:.1%}")
    for reason, n in stats.skipped.items():
        table.add_row(f"skipped: {reason}", f"{n:,}")
    console.print(table)
    for warning in stats.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


def preview_rows(cfg, tokenizer, count: int) -> list[dict]:
    """The first `count` samples as rendered text, token ids and labels (as training sees them); `label` is
    the record's class label or KTO tag ("true": desirable), else None."""
    samples, _ = read_all(cfg)
    rows = []
    for sample in samples[:count]:
        for name, example in encoded_views(tokenizer, sample, cfg.empty_think).items():
            rows.append({"where": sample.where, "kind": sample.kind, "view": name, "label": sample.label,
                         "input_ids": example.input_ids, "labels": example.labels,
                         "trained_tokens": example.num_targets, "over_cutoff": len(example.input_ids) > cfg.cutoff_len})
    return rows


def print_preview(rows: list[dict], tokenizer, plain: bool) -> None:
    """Each sample's text with trained spans highlighted (green) or, in plain mode, wrapped in ⟦ ⟧."""
    for row in rows:
        view = "" if row["view"] == "sample" else f", {row['view']}"
        tag = f", kto_tag {row['label']}" if row["kind"] == "kto" else ""
        title = f"{row['where']} ({row['kind']}{view}{tag}): {len(row['input_ids'])} tokens, " \
                f"{row['trained_tokens']} trained"
        console.rule(title)
        text = Text()
        for trained, ids in _runs(row["input_ids"], row["labels"]):
            piece = tokenizer.decode(ids, skip_special_tokens=False)
            if plain:
                text.append(f"⟦{piece}⟧" if trained else piece)
            else:
                text.append(piece, style="bold green" if trained else "dim")
        console.print(text, soft_wrap=True)
    if not plain:
        console.print("[dim]dim: prompt and context (masked)[/]  [bold green]green: trained tokens[/]")
    else:
        console.print("⟦ ⟧ mark trained tokens; everything else is masked")


def _runs(ids: list[int], labels: list[int]):
    """(trained?, ids) for each run of consecutive tokens with the same trained flag."""
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            yield labels[start] != IGNORE, ids[start:i]
            start = i


def print_json(value) -> None:
    """JSON on stdout (messages go to stderr in --json mode, so the output pipes cleanly)."""
    print(json.dumps(value, ensure_ascii=False, indent=None if isinstance(value, list) else 2))
