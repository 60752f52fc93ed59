"""Batched evaluation generation vs a per-sample `model.generate` loop, same model, prompts and settings.

    python bench/eval_speed.py                 # 100 quickstart prompts on the quickstart's tiny DeepSeek-V3
    python bench/eval_speed.py --prompts 40    # quicker

Both paths decode greedily with the KV cache, `max_new_tokens` 40 (the quickstart's), stop at EOS.
"per-sample" calls `model.generate` once per prompt (what a simple evaluation loop does); "batched"
is r1tune's `generate_texts` (left-padded batches of `--batch` prompts). The outputs are compared:
greedy decoding gives the same text either way, so a mismatch means the batching is wrong (small
numerical differences from padding can flip a near-tie token; their count is printed). Reports
wall seconds and prompts/s of each and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_prompts(n: int, tokenizer) -> list[str]:
    from r1tune.data.encode import generation_prompt

    rows = [json.loads(line) for line in (ROOT / "examples" / "data" / "parity.jsonl").read_text().splitlines()[-n:]]
    conversations = [r["messages"] for r in rows]
    return [generation_prompt(tokenizer, c, "mask") for c in conversations]


@torch.no_grad()
def per_sample(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    texts = []
    for prompt in prompts:
        enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from r1tune.models.generate import generate_texts
    from r1tune.models.loading import load_model
    from r1tune.models.tiny import build_tiny

    logging.disable_progress_bar()
    folder = build_tiny(Path(tempfile.mkdtemp(prefix="r1tune-eval-bench-")) / "tiny", "deepseek_v3")
    model, tokenizer = load_model(str(folder)).eval(), AutoTokenizer.from_pretrained(folder)
    prompts = load_prompts(args.prompts, tokenizer)
    generate_texts(model, tokenizer, prompts[:2], 4, args.batch)  # warm-up
    loop, loop_s = timed(lambda: per_sample(model, tokenizer, prompts, args.max_new_tokens))
    batched, batched_s = timed(lambda: generate_texts(model, tokenizer, prompts, args.max_new_tokens, args.batch))
    differ = sum(a != b for a, b in zip(loop, batched))
    print(f"{len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"per-sample model.generate: {loop_s:6.1f} s  ({len(prompts) / loop_s:5.1f} prompts/s)")
    print(f"batched (batch {args.batch}):       {batched_s:6.1f} s  ({len(prompts) / batched_s:5.1f} prompts/s)")
    print(f"speed-up: {loop_s / batched_s:.2f}x; outputs that differ: {differ} of {len(prompts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
