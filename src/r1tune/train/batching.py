"""Deterministic batch order and padding for causal-LM examples."""

from __future__ import annotations

import math
import random

import torch

from r1tune.data.encode import IGNORE, Example
from r1tune.data.packing import example_lengths, join_examples, pack_groups
from r1tune.train.sampling import balanced_order

GROUP_WINDOW = 50  # batches per length-sorted window
# group_by_length auto: sorting batches by length makes them homogeneous (e.g. one language per
# batch), which can slow convergence, so it is only worth it when padding would waste this share
# of shuffled micro-batches (after cutting, which already pads each piece to its own longest row:
# on the 20M DeepSeek-V3 bench grouping cost 4.074 vs 3.750 held-out loss).
AUTO_GROUP_PADDING = 0.30


def epoch_order(lengths: list[int], batch_size: int, seed: int, epoch: int,
                group_by_length: bool = False, labels: list | None = None) -> list[list[int]]:
    """Micro-batches of example indices for one epoch; the same (seed, epoch) gives the same order.

    group_by_length sorts each window of 50 batches by length before cutting it into batches
    (then shuffles the batches), so samples of similar length share a batch and less is padding.
    With `labels`, the epoch is a class-balanced draw (see sampling.balanced_order).
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if labels is not None:
        order = balanced_order(labels, seed, epoch)
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * GROUP_WINDOW
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def padding_share(lengths: list[int], batches: list[list[int]], budget: int = 0) -> float:
    """Share of token slots that are padding when `batches` are right-padded to their longest sample,
    after each is cut into micro-batches of `budget` tokens (0: uncut) the way training cuts them."""
    pad = real = 0
    for batch in batches:
        for piece in cut_longest_first([lengths[i] for i in batch], budget, size=lambda n: n):
            pad += max(piece) * len(piece) - sum(piece)
            real += sum(piece)
    return pad / max(pad + real, 1)


def steps_per_epoch(n_examples: int, batch_size: int, accumulation: int) -> int:
    return math.ceil(math.ceil(n_examples / batch_size) / accumulation)


class BatchPlan:
    """Which examples form each optimizer step; an epoch's order is computed once, not per step."""

    def __init__(self, examples: list[Example], batch_size: int, accumulation: int, seed: int,
                 group_by_length: bool | None = False, balance: bool = False, epoch_examples=None,
                 micro_tokens: int = 0, lengths: list[int] | None = None):
        self.examples, self.batch_size, self.accumulation = examples, batch_size, accumulation
        self.seed = seed
        self.labels = (examples.labels() if hasattr(examples, "labels") else [e.label for e in examples]) \
            if balance else None
        self.epoch_examples = epoch_examples  # epoch -> examples (augmented), same count and order
        self.lengths = example_lengths(examples) if lengths is None else lengths
        if group_by_length is None:  # auto: group only when shuffled micro-batches would be mostly padding
            shuffled = epoch_order(self.lengths, batch_size, seed, 0, False, self.labels)
            group_by_length = padding_share(self.lengths, shuffled, micro_tokens) >= AUTO_GROUP_PADDING
        self.group_by_length = group_by_length
        self.per_epoch = steps_per_epoch(len(examples), batch_size, accumulation)
        self._epoch, self._batches, self._current = None, [], examples

    def micro_batches(self, step: int) -> list[list[Example]]:
        """The micro-batches that make up global optimizer step `step` (0-based)."""
        epoch, within = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = epoch_order(self.lengths, self.batch_size, self.seed, epoch, self.group_by_length,
                                        self.labels)
            self._current = self.epoch_examples(epoch) if self.epoch_examples else self.examples
        chosen = self._batches[within * self.accumulation:(within + 1) * self.accumulation]
        return [[self._current[i] for i in batch] for batch in chosen]


def step_micro_batches(examples: list[Example], batch_size: int, accumulation: int, seed: int,
                       step: int, group_by_length: bool = False) -> list[list[Example]]:
    """One step's micro-batches without keeping a plan (same result as BatchPlan.micro_batches)."""
    return BatchPlan(examples, batch_size, accumulation, seed, group_by_length).micro_batches(step)


# Widths are rounded up so a run sees a few dozen tensor shapes, not hundreds: oneDNN's bf16
# kernels keep per-shape state, and free-form widths grew a 20M Qwen2 run's peak RSS from 1.3 to
# 2.5 GB at the same speed (bench/train_throughput.py before and after commit d9eb960). Also what
# GPU tensor cores like. Short rows get a finer step: rounding GRPO's 84-token rows (prompt +
# 64-token completion) up to 128 made a third of every update padding (tiny Qwen2, 16 rows,
# forward + backward: 219 ms at width 128, 150 ms at 96).
PAD_MULTIPLE = 64


def pad_multiple(longest: int) -> int:
    """The rounding step for a batch whose longest row has `longest` tokens: 16 up to 128, 32 up to 256, then 64."""
    return 16 if longest <= 128 else 32 if longest <= 256 else PAD_MULTIPLE


def padded_width(longest: int, multiple: int | None = None) -> int:
    multiple = multiple or pad_multiple(longest)
    return -(-longest // multiple) * multiple


# On CPU, bigger matmuls are hardly faster: 512 tokens vs 1,024 cost 2-10 % of step time on a 20M Qwen2
# and 9-12 % on the 20M DeepSeek-V3 (smaller expert groups; bench/micro_batch.py), and halve activations.
CPU_MICRO_BATCH_TOKENS = 512
# Smaller models get more tokens per micro-batch, in proportion to their matmul work per token (whole
# multiples of 512, at most 4,096): each micro-batch has fixed costs (Python, kernel launches, a pair
# stage's reference pass) that small matmuls do not hide. One epoch of bench/dpo_vs_trl.py's 3.8M Qwen2
# (hidden 256, 4 layers: 1/6 of the 20M's work per token) took, by micro_batch_tokens
# (python bench/pair_batches.py --budgets 1536 2048 3072 4096 [--stage sft]):
# DPO 26.2-27.4 s at 1,536, 22.6 at 2,048, 20.9 at 3,072, 20.8 at 4,096; SFT 17.8 s at 1,536, 13.5 at 3,072
# (AMX, bf16), 18.1-18.5 vs 15.8-16.0 s with AVX-512 switched off (fp32).
# Activation memory per token shrinks with the width (hidden 256 x 4 layers at 3,072: 0.5 GB estimated).
REFERENCE_TOKEN_FLOPS = 19_267_584  # token_matmul_flops of the 20M Qwen2 above (hidden 512, 6 layers)
CPU_MICRO_BATCH_MAX_STEPS = 8


def token_matmul_flops(config) -> int:
    """Rough multiply-adds of one token through the layers: attention projections and the dense MLP
    (an MoE is counted by its `intermediate_size`: DeepSeek's dense size, more than its routed work per token;
    one expert's size where that is all the config has, e.g. Mixtral, less)."""
    hidden = getattr(config, "hidden_size", 0)
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    return getattr(config, "num_hidden_layers", 0) * hidden * (4 * hidden + 3 * mlp)


def micro_batch_budget(setting: int | None, device_type: str, config=None) -> int:
    """Padded tokens allowed per micro-batch; 0 means whole batches."""
    if setting is not None:
        return setting
    if device_type != "cpu":
        return 0
    per_token = token_matmul_flops(config) if config is not None else 0
    steps = REFERENCE_TOKEN_FLOPS // per_token if per_token else 1
    return CPU_MICRO_BATCH_TOKENS * max(1, min(CPU_MICRO_BATCH_MAX_STEPS, steps))


def split_by_tokens(batch: list[Example], budget: int, multiple: int | None = None) -> list[list[Example]]:
    """Longest-first sub-batches whose padded size (rows x collate's width) stays within `budget`
    (one row at least).

    Sorting first also cuts padding: each sub-batch is padded only to its own longest row.
    """
    return cut_longest_first(batch, budget, size=lambda e: len(e.input_ids), multiple=multiple)


def cut_longest_first(items: list, budget: int, size, multiple: int | None = None) -> list[list]:
    """split_by_tokens for any items with a `size` (token count); budget <= 0 keeps them whole."""
    if budget <= 0:
        return [items]
    parts, current = [], []
    for item in sorted(items, key=size, reverse=True):
        if current and (len(current) + 1) * padded_width(size(current[0]), multiple) > budget:
            parts.append(current)
            current = []
        current.append(item)
    return parts + [current] if current else parts


def collate(batch: list[Example], pad_id: int, attn: str = "sdpa",
            multiple: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (rounded up to `multiple`); padding is masked out of attention and loss.

    Packed rows (Example.segments) get positions restarting per sample and a
    block-diagonal causal mask; `attn` is the model's attention implementation,
    which decides the mask's form (bool for SDPA, additive for eager, none for flash).
    """
    width = padded_width(max(len(e.input_ids) for e in batch), multiple)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask, "num_tokens": mask.sum()}
    if any(e.segments for e in batch):
        segment_ids, positions = _segments(batch, width)
        out["position_ids"] = positions
        out["attention_mask"] = block_causal_mask(segment_ids, attn)
    return out


def collate_packed(rows: list[Example], pad_id: int, attn: str = "sdpa") -> dict[str, torch.Tensor]:
    """`rows` placed side by side in as few rows as fit the longest one's padded width, each attending
    to itself only (no padding between them); `row_ids` maps every token to its row in `rows` (-1: padding).

    Whole rows still score as whole sequences: for preference pairs, whose chosen and rejected answers
    differ in length, this cut bench/dpo_vs_trl.py's epoch from 165k token positions to 133k for 107k real tokens
    (python bench/pair_batches.py --packing)."""
    width = padded_width(max(len(row.input_ids) for row in rows))
    groups = pack_groups([len(row.input_ids) for row in rows], width)
    batch = collate([join_examples([rows[i] for i in group]) for group in groups], pad_id, attn)
    row_ids = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
    for packed, group in enumerate(groups):
        start = 0
        for i in group:
            row_ids[packed, start:start + len(rows[i].input_ids)] = i
            start += len(rows[i].input_ids)
    return {**batch, "row_ids": row_ids}


def _segments(batch: list[Example], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: which packed sample it belongs to (0 = padding) and its position inside it."""
    segment_ids = torch.zeros((len(batch), width), dtype=torch.long)
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        start = 0
        for number, size in enumerate(example.segments or (len(example.input_ids),), start=1):
            segment_ids[row, start:start + size] = number
            positions[row, start:start + size] = torch.arange(size)
            start += size
    return segment_ids, positions


def block_causal_mask(segment_ids: torch.Tensor, attn: str) -> torch.Tensor | None:
    """(batch, 1, L, L) mask letting a token see earlier tokens of its own sample only.

    Padding tokens see themselves, so no attention row is empty (SDPA would give NaN).
    """
    if attn.startswith("flash"):
        return None  # transformers derives varlen boundaries from the restarting position_ids
    length = segment_ids.size(1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = (same & causal) | torch.eye(length, dtype=torch.bool)
    allowed = allowed[:, None, :, :]
    if attn == "sdpa":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments for the model's forward (a stage's batch may carry more)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss after the causal shift."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
