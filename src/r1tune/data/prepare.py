"""From the config to the training and validation examples: the tokenized cache, or in memory."""

from __future__ import annotations

from r1tune.data.cache import prepare_cached
from r1tune.data.dataset import (CHUNK, DataReport, PreparedData, encode_all, load_samples, split_validation)
from r1tune.data.leakage import find_leakage
from r1tune.data.packing import pack_examples
from r1tune.errors import UserError
from r1tune.stages import stage_data


def prepare_data(cfg, tokenizer, say=print) -> PreparedData:
    """Train/validation examples: from the tokenized cache (built on a miss) or, with
    augmentation or data_cache: false, encoded in memory; then checks and packing."""
    if cfg.data_cache and not cfg.augment_options().enabled() and stage_data(cfg.stage).cached:
        data = prepare_cached(cfg, tokenizer, say)
    else:
        data = _prepare_in_memory(cfg, tokenizer)
    if cfg.balance_classes:
        labels = data.train.labels() if hasattr(data.train, "labels") else [e.label for e in data.train]
        unlabelled = sum(label is None for label in labels)
        if unlabelled:
            raise UserError(f"{cfg.source}: 'balance_classes' needs every training record labelled "
                            f"(classification 'text' + 'label'); {unlabelled} of {len(labels)} have no label")
    if cfg.use_packing:
        data.train, data.val = pack_examples(data.train, cfg.cutoff_len), pack_examples(data.val, cfg.cutoff_len)
        data.report.packed_rows = len(data.train)
    return data


def _prepare_in_memory(cfg, tokenizer) -> PreparedData:
    report = DataReport()
    skipped = report.skipped if cfg.on_bad_record == "skip" else None
    load = dict(skipped=skipped, stage=cfg.stage, seed=cfg.seed)
    samples = load_samples(cfg.dataset, cfg.dataset_dir, cfg.max_samples, mix_strategy=cfg.mix_strategy,
                           interleave_probs=cfg.interleave_probs, **load)
    if cfg.eval_dataset:
        train_items = samples
        val_items = load_samples(cfg.eval_dataset, cfg.dataset_dir, cfg.max_samples, key="eval_dataset", **load)
    else:
        train_items, val_items = split_validation(samples, cfg.val_size, cfg.seed, cfg.source)
    train, train_samples = encode_all(tokenizer, train_items, cfg, report)
    val, val_samples = encode_all(tokenizer, val_items, cfg, report)
    if not train:
        reasons = ", ".join(f"{n} × {r}" for r, n in report.dropped.items())
        raise UserError(f"no training sample is left after tokenization ({reasons}); raise cutoff_len or shorten the prompts")
    if val_samples:
        report.leakage = find_leakage(val_samples, [train_items[i:i + CHUNK] for i in range(0, len(train_items), CHUNK)])
    return PreparedData(train, val, val_samples, train_samples, report)
