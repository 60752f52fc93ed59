"""Merge a trained adapter into its base and save a plain transformers model, with a parity check.

The merged folder holds sharded safetensors, the tokenizer with its chat template and the
generation config, so `AutoModelForCausalLM.from_pretrained(folder)` needs nothing from r1tune.
The check reloads that folder with plain transformers and compares its logits with r1tune's
unmerged model on a fixed batch (fp32); the command fails when they differ by more than 1e-4.
The folder is written beside its final place and renamed into it, so it is never half-written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from r1tune.fileio import atomic_folder

PARITY_LIMIT = 1e-4


@dataclass
class MergeResult:
    folder: Path
    max_abs_diff: float
    shards: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= PARITY_LIMIT


def probe_batch(vocab_size: int, seed: int = 0) -> dict:
    """A fixed batch with one padded row, for comparing logits."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, min(vocab_size, 1000), (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits_of(model, batch: dict) -> torch.Tensor:
    model.eval()
    out = model(**batch, use_cache=False).logits.float()
    return out * batch["attention_mask"][..., None]  # padded positions do not count


def safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def merge_to_folder(model, tokenizer, final: Path, shard_gb: float, extra_files: dict[str, str] | None = None,
                    device: str = "cpu") -> MergeResult:
    """Merge (PEFT adapters, on `device`) or keep (a full model), save to `final` with `extra_files`
    (name -> text), reload with plain transformers, compare (both on the CPU in fp32)."""
    from transformers import AutoModelForCausalLM

    from r1tune.models.methods import exact_lora_targets

    batch = probe_batch(model.config.vocab_size)
    expected = logits_of(model, batch)  # before moving: the reference is the CPU fp32 model
    model = model.to(device)
    merged = model.merge_and_unload() if hasattr(model, "peft_config") else model
    with atomic_folder(final) as tmp:  # a failed save or reload leaves `final` as it was
        with exact_lora_targets():
            merged.save_pretrained(tmp, max_shard_size=f"{int(shard_gb * 1024)}MB", safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        diff = (logits_of(reloaded, batch) - expected).abs().max().item()
        shards = len(list(tmp.glob("*.safetensors")))
    return MergeResult(final, diff, shards)
