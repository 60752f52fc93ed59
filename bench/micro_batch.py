"""Step time of the CPU micro-batch budget and of trimming the heap after each step, side by side.

    python bench/micro_batch.py                     # 20M Qwen2 and 20M DeepSeek-V3
    python bench/micro_batch.py --models qwen2-20M

One process per model trains LoRA r16 (all linear layers, bf16 autocast, chunked loss) on
batches of 8 rows at widths 128, 256, 512 and 1,024, each cut into micro-batches by
r1tune's own rule (batching.cut_longest_first). The variants alternate
round by round after a warm-up, so drift on this shared 2-core machine hits them alike;
the ratio of their summed times is what to read, not the seconds. Memory is measured by
bench/train_throughput.py on a whole run (peak RSS depends on the run's mix of shapes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

MODELS = {"qwen2-20M": ("qwen2", 512, 6), "deepseek_v3-20M": ("deepseek_v3", 448, 6)}
WIDTHS, ROWS = (128, 256, 512, 1024), 8


def pieces(budget: int, width: int) -> list[tuple[int, int]]:
    """(rows, width) of each micro-batch when training cuts a batch of ROWS rows of `width` tokens."""
    from r1tune.train.batching import cut_longest_first

    return [(len(part), width) for part in cut_longest_first([width] * ROWS, budget, size=lambda n: n)]


def build(arch: str, hidden: int, layers: int, work: Path):
    from transformers import AutoModelForCausalLM

    from r1tune.models.methods import attach_lora, resolve_lora_targets
    from r1tune.models.tiny import build_tiny
    from r1tune.train.chunked_loss import plain_head

    path = build_tiny(work / arch, arch, hidden_size=hidden, num_layers=layers)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for param in model.parameters():
        param.requires_grad = False
    model = attach_lora(model, 16, 32, 0.0, resolve_lora_targets(model, "all", include_experts=True))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, plain_head(model), optimizer


def run_epoch(model, split, optimizer, budget: int, trim: bool) -> float:
    """One optimizer step per width; seconds."""
    from r1tune.train.chunked_loss import chunked_loss_sum
    from r1tune.train.memory import release_free_memory

    decoder, head = split
    vocab = model.config.vocab_size
    start = time.perf_counter()
    for width in WIDTHS:
        for rows, seq in pieces(budget, width):
            ids = torch.randint(3, vocab, (rows, seq))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden = decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
                loss = chunked_loss_sum(hidden, head.weight, ids) / ids.numel()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if trim:
            release_free_memory()
    return time.perf_counter() - start


def compare(setup, variants: dict[str, tuple[int, bool]], rounds: int) -> dict[str, float]:
    for budget, trim in variants.values():  # warm-up: every shape once
        run_epoch(*setup, budget, trim)
    totals = dict.fromkeys(variants, 0.0)
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            totals[name] += run_epoch(*setup, *variants[name])
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="r1tune-micro-bench-"))
    print(f"{'model':<18}{'comparison':<38}{'seconds':>18}{'time ratio':>12}")
    for name in args.models:
        setup = build(*MODELS[name], work)
        for label, variants in (("512 vs 1,024 tokens (no trim)", {"a": (512, False), "b": (1024, False)}),
                                ("trim vs no trim (512 tokens)", {"a": (512, True), "b": (512, False)})):
            t = compare(setup, variants, args.rounds)
            print(f"{name:<18}{label:<38}{t['a']:>8.1f} vs {t['b']:>7.1f}{t['a'] / t['b']:>11.3f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
