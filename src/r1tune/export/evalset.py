"""The data the quantized exports (int8, bitsandbytes) are scored on: perplexity, teacher-forced on the
trained labels of the run's held-out split, rebuilt exactly as training and `r1tune eval` build it
(prepare_data); four fixed English sentences when there is no run or it has no held-out data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from r1tune.data.encode import Example
from r1tune.errors import UserError
from r1tune.ui import console

HELD_OUT_LIMIT = 64
FIXED_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "To compute the area of a circle, multiply pi by the square of the radius.",
    "She opened the window, and the cold morning air filled the room.",
]


@dataclass
class EvalSet:
    examples: list[Example]
    description: str  # printed after "perplexity on", e.g. "32 held-out samples"
    batch_size: int = 8


def fixed_sentences(tokenizer, why: str = "no held-out data given") -> EvalSet:
    """Every token of each sentence is scored."""
    examples = [Example(ids, list(ids)) for ids in (tokenizer(t).input_ids for t in FIXED_SENTENCES)]
    return EvalSet(examples, f"{len(examples)} fixed sentences ({why})")


def export_eval_set(cfg, tokenizer, run_dir: Path | None) -> EvalSet:
    """Up to HELD_OUT_LIMIT held-out samples of the run (val_size split of dataset, or eval_dataset)."""
    if run_dir is None:
        return fixed_sentences(tokenizer, "no r1tune run in the config")
    from r1tune.data.prepare import prepare_data

    try:
        run = training_config(run_dir) or cfg
        if not run.dataset or not (run.val_size or run.eval_dataset):
            return fixed_sentences(tokenizer, "the run has no held-out data")
        unpacked = run.model_copy(update={"packing": False, "neat_packing": False})  # one sample per row
        val = list(prepare_data(unpacked, tokenizer, say=lambda *a, **k: None).val[:HELD_OUT_LIMIT])
    except UserError as exc:  # e.g. exporting on a machine without the data: the merged model is already written
        console.print(f"note: the run's held-out data could not be rebuilt ({exc})")
        return fixed_sentences(tokenizer, "the run's held-out data could not be read")
    if not val:
        return fixed_sentences(tokenizer, "the run's held-out split is empty")
    return EvalSet(val, f"{len(val)} held-out samples", cfg.per_device_eval_batch_size)


def training_config(run_dir: Path):
    """The config the run saved, which fixes its held-out split; None when it saved none.
    Keys at their defaults are dropped first: the saved file lists every key, and the other methods'
    ones would each print a no-effect notice."""
    from r1tune.config import RunConfig, validate_config
    from r1tune.models.run_loading import training_config as saved_keys

    fields = RunConfig.model_fields
    raw = {k: v for k, v in saved_keys(run_dir).items() if k in fields and v != fields[k].default}
    return validate_config(raw, source=str(run_dir / "r1tune_config.yaml")) if raw else None


def eval_perplexity(model, evalset: EvalSet, tokenizer) -> float:
    """The held-out perplexity training and r1tune eval report (train.held_out)."""
    from r1tune.train.held_out import held_out_sum, perplexity

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # padding is masked out
    total, count = held_out_sum(model, evalset.examples, pad_id, evalset.batch_size)
    return perplexity(total / max(count, 1))
