"""Gradient checkpointing only when memory requires it.

Checkpointing saves most activation memory but costs about a quarter of the throughput
here (bench/train_throughput.py: 1,798 -> 1,344 tokens/s, 2.92 -> 1.79 GB on a 20M Qwen2).
So with `gradient_checkpointing` left empty r1tune estimates the activations the largest
micro-batch keeps for the backward pass and turns checkpointing on only when they exceed
the budget (`memory_budget_gb`, default half of the memory available at start). The largest
micro-batch is the one left after cutting batches to `micro_batch_tokens` (batching.py),
which on CPU already bounds them (512 tokens on a 20M model, up to 4,096 on smaller ones).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import psutil

ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_SIZE = 32  # oneDNN's default is 1,024 primitives
BYTES_PER_HIDDEN = 4 * 18  # fp32 tensors of width `hidden` saved per token and layer (projections, norms, MLP)


def token_activation_bytes(config) -> int:
    """Rough activation memory one token keeps for the backward pass, over all layers."""
    hidden = getattr(config, "hidden_size", 0)
    mlp = getattr(config, "intermediate_size", 4 * hidden)
    return getattr(config, "num_hidden_layers", 0) * (BYTES_PER_HIDDEN * hidden + 4 * 3 * mlp)


def activation_bytes(config, batch_size: int, seq_len: int) -> int:
    """Rough activation memory of one micro-batch: per-token tensors plus the attention matrices."""
    layers = getattr(config, "num_hidden_layers", 0)
    heads = getattr(config, "num_attention_heads", 1)
    attention = 4 * 2 * heads * seq_len * seq_len  # scores and probabilities per sequence
    return batch_size * (seq_len * token_activation_bytes(config) + layers * attention)


def budget_bytes(budget_gb: float | None) -> int:
    if budget_gb is not None:
        return int(budget_gb * 2**30)
    return psutil.virtual_memory().available // 2


def checkpointing_decision(setting: bool | None, config, batch_size: int, seq_len: int,
                           budget_gb: float | None) -> tuple[bool, str]:
    """(use checkpointing?, why) for the run."""
    if setting is not None:
        return setting, "set in the config"
    need, have = activation_bytes(config, batch_size, seq_len), budget_bytes(budget_gb)
    reason = f"auto: ~{need / 2**30:.1f} GB of activations vs a {have / 2**30:.1f} GB budget"
    return need > have, reason


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None off glibc (macOS, musl, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_free_memory() -> bool:
    """Give freed heap pages back to the OS; True if that was possible here.

    glibc keeps freed memory for reuse, so on CPU every micro-batch shape seen leaves its
    high-water mark in RSS and the peak creeps up through a run. Trimming after each
    optimizer step (with 512-token micro-batches: 1.24 -> 1.08 GB peak on the 20M Qwen2 in
    bench/train_throughput.py) costs 0-4 % of step time on a 20M Qwen2 and ~10 % on the 20M DeepSeek-V3 (re-faulting the pages;
    bench/micro_batch.py).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def limit_onednn_cache(capacity: int = ONEDNN_CACHE_SIZE) -> None:
    """Cap oneDNN's primitive cache (bf16 matmuls on CPU) unless the user has set it.

    Each cached primitive keeps memory (about 1 MB for one 448x1232 bf16 linear layer's
    shapes), and training on CPU meets new bf16 matmul shapes with new sequence widths and
    micro-batch row counts, so with the default 1,024 entries RSS only grows:
    20M DeepSeek-V3 bench run 1.35 GB peak at 1,024 entries, 1.06 GB at 32, with no loss of
    speed (bench/onednn_cache.py). oneDNN reads the variable when it creates its first
    primitive, so this must run before the first bf16 matmul.
    """
    os.environ.setdefault(ONEDNN_CACHE_ENV, str(capacity))


def peak_memory_gb(device) -> float:
    """This process's peak memory so far: allocated GPU memory on CUDA, else the resident set (RSS high-water mark)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
