"""Does torch.compile pay for LoRA training on this CPU? Eager vs compiled decoder, same steps.

    python bench/compile_step.py                 # qwen2 ~20M, LoRA r=16, bf16 autocast, chunked loss
    python bench/compile_step.py --fp32

Both variants train micro-batch shapes like r1tune's (widths padded to multiples of 64, about
1,024 tokens per micro-batch: the CPU default when the README's figure was measured; it is 512 now): one warm-up pass over the shapes (for
the compiled model this is where it compiles; reported separately), then three timed passes.
Reported: compile/warm-up seconds, steady tokens/s, and the ratio; the losses of the last pass
are compared so a faster but wrong graph would show.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

WIDTHS = (128, 192, 256, 384, 512, 768, 1024)
MICRO_TOKENS = 1024


def run(model_dir: Path, compiled: bool, bf16: bool) -> tuple[float, float, list[float]]:
    """(warm-up seconds, steady tokens/s, last-pass losses)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from r1tune.train.chunked_loss import chunked_loss_sum, plain_head

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    decoder, head = plain_head(model)
    forward = torch.compile(decoder) if compiled else decoder
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(10, 1000, (max(1, MICRO_TOKENS // w), w), generator=generator) for w in WIDTHS]

    def one_pass() -> list[float]:
        losses = []
        for ids in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                hidden = forward(input_ids=ids, use_cache=False).last_hidden_state
                loss = chunked_loss_sum(hidden, head.weight, ids) / ids.numel()
            loss.backward()
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    start = time.perf_counter()
    one_pass()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(3):
        losses = one_pass()
    tokens = 3 * sum(b.numel() for b in batches)
    return warm, tokens / (time.perf_counter() - start), losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    args = parser.parse_args()
    from r1tune.models.tiny import build_tiny

    model_dir = build_tiny(Path(tempfile.mkdtemp(prefix="r1tune-compile-")) / "qwen2-20M", "qwen2",
                           hidden_size=512, num_layers=6)
    eager = run(model_dir, False, not args.fp32)
    compiled = run(model_dir, True, not args.fp32)
    print(f"{'variant':<10}{'warm-up s':>11}{'tokens/s':>10}")
    for name, (warm, rate, _) in (("eager", eager), ("compiled", compiled)):
        print(f"{name:<10}{warm:>11.1f}{rate:>10,.0f}")
    drift = max(abs(a - b) for a, b in zip(eager[2], compiled[2]))
    print(f"compiled / eager: {compiled[1] / eager[1]:.2f}x steady; largest loss difference {drift:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
