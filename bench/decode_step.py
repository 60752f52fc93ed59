"""GRPO's rollout speed-ups, one at a time, and CPU training attention by row length.

    python bench/decode_step.py

Part 1: one rollout round (16 rows, 2 prompts x 8, 64 sampled tokens) of a tiny Qwen2 (hidden 256,
4 layers, 3.8M) with LoRA r16 on every linear, through models.decode.complete: PEFT layers and
transformers' forward; LoRA folded (models.lora_fold); folded + the lean step (models.lean_decode).
Part 2: bf16 forward+backward of the same model with LoRA at several row lengths, attention through
r1tune's CPU implementation (written out up to SHORT_ROWS tokens) vs transformers' SDPA.
Each figure is the mean of several repeats after a warm-up, measured side by side in one process.
"""

from __future__ import annotations

import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def timed(f, repeats: int) -> float:
    f()
    start = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - start) / repeats * 1000


def lora_model(path):
    from peft import LoraConfig, get_peft_model

    from r1tune.models.loading import load_model

    return get_peft_model(load_model(str(path)), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))


def rollouts(model) -> None:
    import r1tune.models.decode as decode
    from r1tune.models.lora_fold import folded_lora
    from r1tune.models.sampling import Params

    prompts = [[5 + p, 9, 11, 20, 33, 40, 41, 42, 50, 60, 61, 62, 63, 64, 65, 66, 67, 70] for p in range(2) for _ in range(8)]
    model.eval()
    lean = decode.lean_step

    def run(fold: bool, use_lean: bool):
        decode.lean_step = lean if use_lean else (lambda m: None)
        with folded_lora(model) if fold else nullcontext():
            decode.complete(model, prompts, [Params(64, 1.0, 1.0, i) for i in range(16)], set(), 2, 64)

    for name, fold, use_lean in [("PEFT layers, transformers forward", False, False),
                                 ("LoRA folded, transformers forward", True, False),
                                 ("LoRA folded, lean step", True, True)]:
        ms = timed(lambda: run(fold, use_lean), 5)
        print(f"  {name:36s} {ms:7.1f} ms per round ({ms / 64:.2f} ms per token)")
    decode.lean_step = lean


def training_attention(model) -> None:
    from r1tune.models.attention import NAME

    model.train()
    for width, rows in [(96, 16), (256, 6), (1024, 2)]:
        ids = torch.randint(3, 1600, (rows, width), generator=torch.Generator().manual_seed(0))
        figures = []
        for attn in (NAME, "sdpa"):
            model.set_attn_implementation(attn)

            def step():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().mean()
                loss.backward()
            figures.append(timed(step, 5))
        print(f"  {rows:2d} rows x {width:4d} tokens: r1tune {figures[0]:6.1f} ms, transformers SDPA {figures[1]:6.1f} ms")
    model.set_attn_implementation(NAME)


def main() -> None:
    from r1tune.envinfo import cpu_features
    from r1tune.models.tiny import build_tiny

    print(cpu_features())
    path = build_tiny(Path(tempfile.mkdtemp(prefix="r1tune-decode-bench-")) / "qwen2", "qwen2", hidden_size=256,
                      num_layers=4)
    model = lora_model(path)
    print("one rollout round, 16 rows x 64 tokens:")
    rollouts(model)
    print("bf16 forward+backward (LoRA r16), by row length:")
    training_attention(model)


if __name__ == "__main__":
    main()
