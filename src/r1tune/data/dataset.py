"""From the config's `dataset` to encoded train/validation examples and a report."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from tqdm import tqdm

from r1tune.data.chunking import sliding_windows
from r1tune.data.encode import (Example, PairExample, PromptExample, TemplateMismatch, encode_prompts,
                                encode_segments_batch, encode_texts, final_answer_only, render_segments, truncate)
from r1tune.data.formats import Conversation
from r1tune.data.kinds import Sample, pretraining_text, to_sample
from r1tune.data.leakage import Leakage
from r1tune.data.readers import read_records
from r1tune.data.registry import resolve_datasets
from r1tune.errors import UserError
from r1tune.process import is_main
from r1tune.stages import stage_data, wrong_kind_message
from r1tune.fileio import write_text_atomic

NO_TARGET_LEFT = "prompt fills cutoff_len, no answer token left"
PROMPT_TOO_LONG = "prompt longer than cutoff_len"
CHUNK = 1000  # records tokenized per batch call

@dataclass
class SkippedRecord:
    where: str
    reason: str
    record: dict | None


@dataclass
class DataReport:
    records: int = 0
    truncated: int = 0
    chunked: int = 0
    packed_rows: int = 0
    dropped: Counter = field(default_factory=Counter)
    target_tokens: int = 0
    tokens: int = 0
    skipped: list[SkippedRecord] = field(default_factory=list)
    leakage: Leakage | None = None  # validation prompts training also has (None: no validation split)

    def merge(self, other: "DataReport") -> None:
        """Add the counts of a report built elsewhere (a worker's chunk)."""
        for name in ("records", "truncated", "chunked", "target_tokens", "tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.dropped.update(other.dropped)

    def lines(self) -> list[str]:
        kept = self.records - sum(self.dropped.values())
        out = [f"{self.records} records, {kept} kept, {self.truncated} truncated at cutoff_len, "
               f"{self.tokens:,} tokens ({self.target_tokens:,} trained)"]
        if self.chunked:
            out.append(f"{self.chunked} long samples split into sliding windows")
        if self.packed_rows:
            out.append(f"training samples packed into {self.packed_rows} rows")
        out += [f"dropped {n}: {reason}" for reason, n in self.dropped.items()]
        out += [f"skipped {n} bad records: {reason}" for reason, n in Counter(s.reason for s in self.skipped).items()]
        if self.leakage:
            found = f"{self.leakage.leaked} repeat" if self.leakage.leaked else "none repeats"
            out.append(f"{self.leakage.checked} validation prompts compared with training: {found} "
                       "a training prompt exactly or nearly")
        return out


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example]
    val_samples: list[Sample]  # what the validation examples came from (for generation eval)
    train_samples: list[Sample]  # kept for per-epoch augmentation
    report: DataReport

    @property
    def val_conversations(self) -> list[Conversation]:
        return [s.messages for s in self.val_samples if s.kind != "text"]


# --- reading and mixing -----------------------------------------------------------

def load_samples(dataset: str, dataset_dir: str, max_samples: int | None = None,
                 skipped: list[SkippedRecord] | None = None, stage: str | None = None, seed: int = 42,
                 mix_strategy: str = "concat", interleave_probs: str | None = None,
                 key: str = "dataset") -> list[Sample]:
    """Every record of every named dataset as a Sample, mixed as configured.

    Bad records raise, or are collected in `skipped` when given. `stage` None accepts any kind.
    """
    samples = list(iter_samples(dataset, dataset_dir, max_samples, skipped, stage, seed, mix_strategy,
                                interleave_probs, key))
    if not samples:
        raise UserError(f"'{key}' ({dataset}) holds no usable records; check the file is not empty")
    return samples


def iter_samples(dataset: str, dataset_dir: str, max_samples: int | None = None,
                 skipped: list[SkippedRecord] | None = None, stage: str | None = None, seed: int = 42,
                 mix_strategy: str = "concat", interleave_probs: str | None = None,
                 key: str = "dataset") -> Iterator[Sample]:
    """load_samples as a stream: records are read as they are needed, never all held at once."""
    sources = resolve_datasets(dataset, dataset_dir, key)
    probs = parse_probs(interleave_probs, len(sources))

    def opener(source):
        first = [True]

        def open_stream():  # a source re-read by interleave_over does not report bad records twice
            sink = skipped if first[0] else ([] if skipped is not None else None)
            first[0] = False
            return _source_stream(source, max_samples, sink, stage, seed)
        return open_stream
    yield from mix_streams([opener(s) for s in sources], mix_strategy, probs, seed)


def _source_stream(source, max_samples: int | None, skipped, stage: str | None, seed: int) -> Iterator[Sample]:
    if source.num_samples:  # draw from the whole source, then cut to max_samples (as LLaMA-Factory)
        samples = list(_read_source(source, None, skipped, stage))
        drawn = take_num_samples(samples, source.num_samples, seed) if samples else []
        yield from drawn[:max_samples] if max_samples else drawn
    else:
        yield from _read_source(source, max_samples, skipped, stage)


def _read_source(source, max_samples: int | None, skipped, stage: str | None) -> Iterator[Sample]:
    count = 0
    for path in source.paths:
        limit = None if max_samples is None else max_samples - count
        if limit == 0:
            return
        for where, record in read_records(path, limit=limit, skip_bad=skipped is not None):
            try:
                if isinstance(record, UserError):
                    raise record
                sample = _to_stage_sample(record, source.spec, where, stage)
            except UserError as problem:
                if skipped is None:
                    raise
                reason = str(problem).removeprefix(where).lstrip(" :")
                skipped.append(SkippedRecord(where, reason, record if isinstance(record, dict) else None))
                continue
            count += 1
            yield sample


def _to_stage_sample(record: dict, spec, where: str, stage: str | None) -> Sample:
    """The record as the stage reads it; `stage` None reads every kind as itself. A stage that
    trains on one kind only reads every record as that kind, so a missing field is named."""
    if stage is not None and stage_data(stage).reads_text:
        return pretraining_text(record, spec, where)
    kinds = stage_data(stage).kinds if stage is not None else ()
    sample = to_sample(record, spec, where, kind=kinds[0] if len(kinds) == 1 else None)
    if stage is not None and sample.kind not in stage_data(stage).kinds:
        raise UserError(f"{where}: the record {wrong_kind_message(sample.kind, stage)}")
    return sample


def take_num_samples(samples: list, n: int, seed: int) -> list:
    """LLaMA-Factory's num_samples: a seeded subset, or every record repeated plus a seeded remainder."""
    whole, rest = divmod(n, len(samples))
    return samples * whole + random.Random(seed).sample(samples, rest)


def parse_probs(text: str | None, count: int) -> list[float]:
    if not text:
        return [1.0 / max(count, 1)] * count
    try:
        probs = [float(x) for x in str(text).split(",")]
    except ValueError:
        raise UserError(f"'interleave_probs' must be comma-separated numbers, got '{text}'") from None
    if len(probs) != count or any(p < 0 for p in probs) or sum(probs) <= 0:
        raise UserError(f"'interleave_probs' needs {count} non-negative numbers (one per dataset), got '{text}'")
    return [p / sum(probs) for p in probs]


def mix_sources(lists: list[list], strategy: str, probs: list[float], seed: int) -> list:
    """mix_streams over in-memory lists."""
    return list(mix_streams([lambda items=items: iter(items) for items in lists], strategy, probs, seed))


def mix_streams(openers: list, strategy: str, probs: list[float], seed: int) -> Iterator:
    """concat, or interleave: the source of each next record is drawn with `probs` (seeded).

    `openers` return a fresh iterator over a source. interleave_under stops when a drawn
    source has run out; interleave_over re-opens a source that ran out and stops once
    every source has run out at least once.
    """
    if strategy == "concat" or len(openers) == 1:
        for open_stream in openers:
            yield from open_stream()
        return
    rng = random.Random(seed)
    streams = {i: open_stream() for i, open_stream in enumerate(openers) if probs[i] > 0}
    pending = {i: next(stream, _END) for i, stream in streams.items()}
    live = [i for i, item in pending.items() if item is not _END]
    weights, finished = [probs[i] for i in live], set()
    while live:
        i = rng.choices(live, weights=weights)[0]
        yield pending[i]
        pending[i] = next(streams[i], _END)
        if pending[i] is _END:
            if strategy == "interleave_under":
                return
            finished.add(i)
            if len(finished) == len(live):
                return
            streams[i] = openers[i]()
            pending[i] = next(streams[i])


_END = object()


def held_out_indices(total: int, val_size: float, seed: int, source: str = "config") -> set[int]:
    """Which of `total` records validation takes: a seeded shuffle, then a fraction (< 1) or a count (>= 1)."""
    count = int(val_size) if val_size >= 1 else max(1, round(total * val_size))
    if count >= total:
        raise UserError(f"{source}: 'val_size' ({val_size}) would hold out all {total} records; use a smaller value")
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return set(order[:count])


def split_validation(items: list, val_size: float, seed: int, source: str = "config") -> tuple[list, list]:
    """(train, validation) by held_out_indices."""
    if val_size <= 0:
        return items, []
    held = held_out_indices(len(items), val_size, seed, source)
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


# --- tokenizing -------------------------------------------------------------------

def long_sample_mode(cfg) -> str:
    if cfg.long_samples != "auto":
        return cfg.long_samples
    return stage_data(cfg.stage).long_samples


def encode_sample(tokenizer, sample: Sample, empty_think: str) -> Example | PairExample:
    """The whole (untruncated) training example of a sample: a PairExample for a preference pair."""
    return encode_many(tokenizer, [sample], empty_think)[0]


def encode_many(tokenizer, samples: list[Sample], empty_think: str) -> list[Example | PairExample]:
    """encode_sample for a chunk of samples, tokenized in one batch call."""
    prompts = [s for s in samples if s.kind == "prompt"]
    if prompts:  # a stage reads one kind only, so these are all of them
        return encode_prompts(tokenizer, [(_rendered(tokenizer, s, empty_think), s.tools) for s in prompts], empty_think,
                              [s.conversational for s in prompts], [s.columns or {} for s in prompts])
    segments = []  # per sample: None (text) or one segment list per conversation it trains
    for sample in samples:
        segments.append(None if sample.kind == "text" else
                        [_trained_turns(tokenizer, sample, conv, empty_think) for conv in _conversations(sample)])
    chats = iter(encode_segments_batch(tokenizer, [c for s in segments if s is not None for c in s]))
    texts = iter(encode_texts(tokenizer, [s.text for s in samples if s.kind == "text"]))
    out = []
    for sample, seg in zip(samples, segments):
        if sample.kind == "preference":
            example = PairExample(next(chats), next(chats))
        else:
            example = next(texts) if seg is None else next(chats)
        example.label = sample.label
        out.append(example)
    return out


def _rendered(tokenizer, sample: Sample, empty_think: str) -> Conversation:
    """A prompt sample's messages, checked to render with the template (a one-line error naming the record)."""
    segments_or_error(tokenizer, sample.messages + [{"role": "assistant", "content": "-"}], empty_think,
                      sample.tools, sample.where)
    return sample.messages


def _conversations(sample: Sample) -> list[Conversation]:
    if sample.kind != "preference":
        return [sample.messages]
    return [sample.messages + [{"role": "assistant", "content": answer}] for answer in (sample.chosen, sample.rejected)]


def _trained_turns(tokenizer, sample: Sample, messages: Conversation, empty_think: str) -> list[tuple[str, bool]]:
    segments = segments_or_error(tokenizer, messages, empty_think, sample.tools, sample.where)
    return final_answer_only(segments) if sample.kind in ("preference", "kto") else segments


def segments_or_error(tokenizer, messages, empty_think: str, tools, where: str) -> list[tuple[str, bool]]:
    """render_segments, with a template that cannot render the record reported as a UserError."""
    try:
        return render_segments(tokenizer, messages, empty_think, tools)
    except TemplateMismatch as exc:
        raise UserError(f"{where}: {exc}; choose another 'template'") from None


def fit_to_window(example: Example | PairExample, cfg, report: DataReport) -> list:
    """Truncate or chunk to cutoff_len; only parts that still train a token (a pair: both answers; a
    GRPO prompt: whole, within cutoff_len, or dropped)."""
    if isinstance(example, PromptExample):
        return [example] if len(example.input_ids) <= cfg.cutoff_len else []
    if isinstance(example, PairExample):
        pair = PairExample(truncate(example.chosen, cfg.cutoff_len), truncate(example.rejected, cfg.cutoff_len),
                           example.label)
        report.truncated += pair.truncated
        return [pair] if pair.chosen.num_targets and pair.rejected.num_targets else []
    if long_sample_mode(cfg) == "chunk":
        parts = sliding_windows(example, cfg.cutoff_len, cfg.chunk_overlap)
        report.chunked += len(parts) > 1
    else:
        parts = [truncate(example, cfg.cutoff_len)]
        report.truncated += parts[0].truncated
    return [p for p in parts if p.num_targets]


def encode_chunk(tokenizer, samples: list[Sample], cfg, report: DataReport) -> tuple[list[Example], list[Sample]]:
    """Training examples of a chunk of samples and the samples kept (dropped ones left out of both)."""
    examples, kept = [], []
    for sample, full in zip(samples, encode_many(tokenizer, samples, cfg.empty_think)):
        report.records += 1
        parts = fit_to_window(full, cfg, report)
        if not parts:
            report.dropped[PROMPT_TOO_LONG if isinstance(full, PromptExample) else NO_TARGET_LEFT] += 1
            continue
        for part in parts:
            report.tokens += _token_count(part)
            report.target_tokens += part.num_targets
        examples += parts
        kept.append(sample)
    return examples, kept


def _token_count(example: Example | PairExample) -> int:
    if isinstance(example, PairExample):
        return len(example.chosen.input_ids) + len(example.rejected.input_ids)
    return len(example.input_ids)


def encode_all(tokenizer, samples: list[Sample], cfg, report: DataReport) -> tuple[list[Example], list[Sample]]:
    """encode_chunk over all samples, with a progress bar for large sets."""
    examples, kept = [], []
    with tqdm(total=len(samples), desc="tokenizing", disable=len(samples) < 5000 or not is_main(),
              leave=False) as bar:
        for start in range(0, len(samples), CHUNK):
            chunk_examples, chunk_kept = encode_chunk(tokenizer, samples[start:start + CHUNK], cfg, report)
            examples += chunk_examples
            kept += chunk_kept
            bar.update(min(CHUNK, len(samples) - start))
    return examples, kept


def write_skipped(path, skipped: list[SkippedRecord]) -> None:
    """skipped_records.jsonl: each bad record with where it was and why it was skipped."""
    rows = ({"where": item.where, "reason": item.reason, "record": item.record} for item in skipped)
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
