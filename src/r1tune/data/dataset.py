"""From the config's `dataset` to encoded train/validation examples and a report."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from r1tune.data.encode import Example, TemplateMismatch, encode_conversation
from r1tune.data.formats import Conversation, to_conversation
from r1tune.data.readers import read_records
from r1tune.data.registry import resolve_datasets
from r1tune.errors import UserError
from r1tune.fileio import write_text_atomic

NO_TARGET_LEFT = "prompt fills cutoff_len, no answer token left"


@dataclass
class SkippedRecord:
    where: str
    reason: str
    record: dict | None


@dataclass
class DataReport:
    records: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    target_tokens: int = 0
    tokens: int = 0
    skipped: list[SkippedRecord] = field(default_factory=list)

    def lines(self) -> list[str]:
        kept = self.records - sum(self.dropped.values())
        out = [f"{self.records} records, {kept} kept, {self.truncated} truncated at cutoff_len, "
               f"{self.tokens:,} tokens ({self.target_tokens:,} trained)"]
        out += [f"dropped {n}: {reason}" for reason, n in self.dropped.items()]
        out += [f"skipped {n} bad records: {reason}" for reason, n in Counter(s.reason for s in self.skipped).items()]
        return out


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example]
    val_conversations: list[Conversation]
    report: DataReport


def load_conversations(dataset: str, dataset_dir: str, max_samples: int | None,
                       skipped: list[SkippedRecord] | None = None) -> list[tuple[str, Conversation]]:
    """Every record as a Conversation. Bad records raise, or are collected in `skipped` when given."""
    items = []
    for source in resolve_datasets(dataset, dataset_dir):
        for where, record in read_records(source.path, limit=max_samples, skip_bad=skipped is not None):
            problem = record if isinstance(record, UserError) else None
            if problem is None:
                try:
                    items.append((where, to_conversation(record, source.spec, where)))
                    continue
                except UserError as exc:
                    problem = exc
            if skipped is None:
                raise problem
            reason = str(problem).removeprefix(where).lstrip(" :")
            skipped.append(SkippedRecord(where, reason, record if isinstance(record, dict) else None))
    if not items:
        raise UserError(f"dataset '{dataset}' holds no usable records; check the file is not empty")
    return items


def split_validation(items: list, val_size: float, seed: int, source: str = "config") -> tuple[list, list]:
    """Seeded shuffle, then hold out a fraction (< 1) or a count (>= 1)."""
    if val_size <= 0:
        return items, []
    count = int(val_size) if val_size >= 1 else max(1, round(len(items) * val_size))
    if count >= len(items):
        raise UserError(f"{source}: 'val_size' ({val_size}) would hold out all {len(items)} records; use a smaller value")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def encode_all(tokenizer, items: list[tuple[str, Conversation]], cutoff_len: int, empty_think: str,
               report: DataReport) -> tuple[list[Example], list[Conversation]]:
    """Encoded examples and the conversations they came from (dropped records left out of both)."""
    examples, kept = [], []
    for where, conversation in tqdm(items, desc="tokenizing", disable=len(items) < 2000, leave=False):
        report.records += 1
        try:
            example = encode_conversation(tokenizer, conversation, cutoff_len, empty_think)
        except TemplateMismatch as exc:
            raise UserError(f"{where}: {exc}; choose another 'template'") from None
        if example.num_targets == 0:
            report.dropped[NO_TARGET_LEFT] += 1
            continue
        report.truncated += example.truncated
        report.tokens += len(example.input_ids)
        report.target_tokens += example.num_targets
        examples.append(example)
        kept.append(conversation)
    return examples, kept


def prepare_data(cfg, tokenizer) -> PreparedData:
    report = DataReport()
    skipped = report.skipped if cfg.on_bad_record == "skip" else None
    items = load_conversations(cfg.dataset, cfg.dataset_dir, cfg.max_samples, skipped)
    train_items, val_items = split_validation(items, cfg.val_size, cfg.seed, cfg.source)
    train, _ = encode_all(tokenizer, train_items, cfg.cutoff_len, cfg.empty_think, report)
    val, val_conversations = encode_all(tokenizer, val_items, cfg.cutoff_len, cfg.empty_think, report)
    if not train:
        reasons = ", ".join(f"{n} × {r}" for r, n in report.dropped.items())
        raise UserError(f"no training sample is left after tokenization ({reasons}); raise cutoff_len or shorten the prompts")
    return PreparedData(train, val, val_conversations, report)


def write_skipped(path, skipped: list[SkippedRecord]) -> None:
    """skipped_records.jsonl: each bad record with where it was and why it was skipped."""
    rows = ({"where": item.where, "reason": item.reason, "record": item.record} for item in skipped)
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
