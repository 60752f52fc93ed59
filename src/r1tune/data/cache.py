"""Tokenized data cached on disk, built by streaming, keyed by everything that shapes it.

The key hashes the data files' bytes, dataset_info.json, the tokenizer (vocabulary,
merges, added tokens, chat template) and every option that changes the examples
(stage, template handling, cutoff_len, chunking, split, mixing, seed...). A rerun
with the same key maps the stored examples and skips tokenization; any change builds
a new entry. Building streams records through chunked batch tokenization (optionally
in worker processes) into memory-mapped files, so neither building nor training holds
the data set in memory. The entry is written to a temp folder and renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from r1tune.data.dataset import (CHUNK, DataReport, PreparedData, SkippedRecord, encode_all, encode_chunk,
                                 held_out_indices, iter_samples, load_samples)
from r1tune.data.kinds import Sample
from r1tune.data.leakage import Leakage, find_leakage
from r1tune.data.registry import resolve_datasets
from r1tune.data.store import ExampleStore, StoreWriter
from r1tune.errors import UserError
from r1tune.fileio import atomic_folder
from r1tune.process import is_main

FORMAT_VERSION = 2
KEY_OPTIONS = ("stage", "dataset", "eval_dataset", "dataset_dir", "cutoff_len", "max_samples", "mix_strategy",
               "interleave_probs", "val_size", "seed", "empty_think", "long_samples", "chunk_overlap",
               "on_bad_record", "template", "add_tokens", "add_tokens_file")


def cache_root(cfg) -> Path:
    if cfg.data_cache_dir:
        return Path(cfg.data_cache_dir).expanduser()
    base = os.environ.get("R1TUNE_CACHE") or Path.home() / ".cache" / "r1tune"
    return Path(base) / "data"


def _code_digest() -> str:
    """A digest of the data package's source: an upgrade that changes encoding never reuses old entries."""
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


def cache_key(cfg, tokenizer) -> str:
    h = hashlib.blake2b(digest_size=16)
    options = {k: getattr(cfg, k) for k in KEY_OPTIONS}
    h.update(json.dumps({"version": FORMAT_VERSION, "code": _code_digest(), **options}, sort_keys=True,
                        default=str).encode())
    for spec, key in ((cfg.dataset, "dataset"), (cfg.eval_dataset, "eval_dataset")):
        if spec:
            for source in resolve_datasets(spec, cfg.dataset_dir, key):
                h.update(json.dumps(dataclasses.asdict(source.spec), sort_keys=True).encode())
                h.update(str(source.num_samples).encode())
                for path in source.paths:
                    _hash_file(h, path)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    return h.hexdigest()


def _hash_file(h, path: Path) -> None:
    h.update(str(path.name).encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)


def prepare_cached(cfg, tokenizer, say=print) -> PreparedData:
    """PreparedData from the cache entry for this config and tokenizer, building it if needed."""
    folder = cache_root(cfg) / cache_key(cfg, tokenizer)
    if (folder / "report.json").is_file() and not cfg.overwrite_cache:
        try:
            data = load_entry(folder)
            say(f"data: reusing tokenized cache {folder}")
            return data
        except (OSError, ValueError, KeyError, TypeError):  # a damaged entry is a miss
            say(f"data: cache entry {folder} is damaged; rebuilding it")
    try:
        _build(cfg, tokenizer, folder)
    except OSError as exc:
        raise UserError(f"{cfg.source}: cannot write the tokenized cache in '{folder.parent}' ({exc.strerror}); "
                        "set data_cache_dir to a writable folder, or data_cache: false") from None
    say(f"data: tokenized and cached in {folder}")
    return load_entry(folder)


def load_entry(folder: Path) -> PreparedData:
    report = DataReport(**json.loads((folder / "report.json").read_text(encoding="utf-8")))
    report.dropped = _counter(report.dropped)
    report.leakage = Leakage(**report.leakage) if report.leakage else None
    report.skipped = [SkippedRecord(**row) for row in _read_jsonl(folder / "skipped.jsonl")]
    val_samples = [Sample(**row) for row in _read_jsonl(folder / "val_samples.jsonl")]
    return PreparedData(ExampleStore(folder, "train"), ExampleStore(folder, "val"), val_samples, [], report)


def _build(cfg, tokenizer, folder: Path) -> None:
    # built in a temp folder that replaces an older entry whole; removed if building fails
    with atomic_folder(folder) as tmp:
        report = DataReport()
        open_train, val_samples = _split_streams(cfg, report)
        train_stream = open_train(report.skipped if cfg.on_bad_record == "skip" else None)
        with StoreWriter(tmp, "train") as writer, \
                tqdm(desc="tokenizing", unit=" records", leave=False, disable=None if is_main() else True) as bar:
            for examples, part in _encoded_chunks(tokenizer, _chunks(train_stream), cfg):
                writer.add(examples)
                report.merge(part)
                bar.update(part.records)
        if not report.records:
            raise UserError(f"'dataset' ({cfg.dataset}) holds no usable records; check the file is not empty")
        if not writer.count:
            reasons = ", ".join(f"{n} × {r}" for r, n in report.dropped.items())
            raise UserError(f"no training sample is left after tokenization ({reasons}); "
                            "raise cutoff_len or shorten the prompts")
        val, kept = encode_all(tokenizer, val_samples, cfg, report)
        if kept:  # a second pass over training: only the validation prompts are held
            report.leakage = find_leakage(kept, _chunks(open_train([] if cfg.on_bad_record == "skip" else None)))
        with StoreWriter(tmp, "val") as val_writer:
            val_writer.add(val)
        _write_jsonl(tmp / "val_samples.jsonl", (dataclasses.asdict(s) for s in kept))
        _write_jsonl(tmp / "skipped.jsonl", (dataclasses.asdict(s) for s in report.skipped))
        counts = {f.name: getattr(report, f.name) for f in dataclasses.fields(report) if f.name != "skipped"}
        counts["dropped"] = dict(report.dropped)  # (asdict would rebuild the Counter from tuples)
        counts["leakage"] = dataclasses.asdict(report.leakage) if report.leakage else None
        (tmp / "report.json").write_text(json.dumps(counts), encoding="utf-8")


def _split_streams(cfg, report: DataReport):
    """(open_train(skipped) -> training sample stream, validation samples): eval_dataset, or val_size held
    out as split_validation does. Validation fills while the first training stream is consumed."""
    skipped = report.skipped if cfg.on_bad_record == "skip" else None
    load = dict(stage=cfg.stage, seed=cfg.seed)
    mixed = dict(mix_strategy=cfg.mix_strategy, interleave_probs=cfg.interleave_probs)

    def records(sink):
        return iter_samples(cfg.dataset, cfg.dataset_dir, cfg.max_samples, sink, **load, **mixed)
    if cfg.eval_dataset:
        val = load_samples(cfg.eval_dataset, cfg.dataset_dir, cfg.max_samples, skipped, key="eval_dataset", **load)
        return records, val
    if cfg.val_size <= 0:
        return records, []
    quiet = [] if skipped is not None else None  # the counting pass reports nothing
    total = sum(1 for _ in records(quiet))
    if not total:
        raise UserError(f"'dataset' ({cfg.dataset}) holds no usable records; check the file is not empty")
    held = held_out_indices(total, cfg.val_size, cfg.seed, cfg.source)
    val: list[Sample] = []

    def train(sink):
        fill = not val
        for index, sample in enumerate(records(sink)):
            if index not in held:
                yield sample
            elif fill:
                val.append(sample)
    return train, val


def _chunks(stream):
    while chunk := list(islice(stream, CHUNK)):
        yield chunk


# --- workers ------------------------------------------------------------------------

_WORKER: dict = {}


def _encoded_chunks(tokenizer, chunks, cfg):
    workers = min(max(1, cfg.preprocessing_num_workers or 1), os.cpu_count() or 1)
    if "fork" not in multiprocessing.get_all_start_methods():
        workers = 1  # workers inherit the tokenizer by fork; elsewhere tokenize in-process
    if workers == 1:
        for chunk in chunks:
            part = DataReport()
            examples, _ = encode_chunk(tokenizer, chunk, cfg, part)
            yield examples, part
        return
    context = multiprocessing.get_context("fork")
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # each worker tokenizes on one thread
    try:
        with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer, cfg)) as pool:
            yield from pool.imap(_encode_in_worker, chunks)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _init_worker(tokenizer, cfg) -> None:
    _WORKER.update(tokenizer=tokenizer, cfg=cfg)


def _encode_in_worker(chunk):
    part = DataReport()
    examples, _ = encode_chunk(_WORKER["tokenizer"], chunk, _WORKER["cfg"], part)
    return examples, part


# --- small file helpers ------------------------------------------------------------------

def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _counter(value):
    from collections import Counter

    return Counter(value or {})
