"""How r1tune's training speed and memory scale with sequence length, model size and vocabulary.

    python bench/scaling.py                      # qwen2 ~4M/~20M/~100M x sequence 256..4096, 129k vocabulary at 2048
    python bench/scaling.py --plot scaling.png   # also draw the table
    python bench/scaling.py --quick              # two lengths, small model only

Every cell is one `r1tune train` process with the defaults a user gets (LoRA r=16 on all
linear layers, bf16 autocast where native, token-budget micro-batches, chunked loss), stage
`pt` over synthetic text cut into windows of exactly the sequence length, batch 8,192 tokens
per step (rows = 8,192 / length), 4 optimizer steps. Reported: non-padding tokens/s over the
training loop, peak RSS of the process, and model FLOP/s (4 x parameters x tokens plus attention:
the matmuls LoRA runs) against a 2,048^3 bf16 matmul measured once at the start. The
vocabulary rows give a Qwen2 ~20M body a DeepSeek-sized 129,280-token vocabulary and train at
sequence 2,048 with the chunked loss on and off. Nothing else may run at the same time.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from configs import write_config  # noqa: E402
from train_throughput import WORDS, matmul_ceiling, measure  # noqa: E402

SIZES = {"qwen2-4M": (256, 4), "qwen2-20M": (512, 6), "qwen2-100M": (1024, 8)}
LENGTHS = (256, 512, 1024, 2048, 4096)
DEEPSEEK_VOCAB = 129_280
STEP_TOKENS = 8192


def write_text(path: Path, docs: int = 16, words: int = 3000, seed: int = 0) -> None:
    """Long documents, so every window but each document's last is exactly the sequence length."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")


def build_model(folder: Path, hidden: int, layers: int, vocab: int | None = None) -> Path:
    """A tiny Qwen2 (r1tune tiny); with `vocab`, its embedding and head widened to that many rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1tune.models.tiny import build_tiny, model_config, widen_output_head

    path = build_tiny(folder, "qwen2", hidden_size=hidden, num_layers=layers)
    if vocab:
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model_config("qwen2", vocab, hidden, layers, tokenizer))
        widen_output_head(model, hidden)
        model.save_pretrained(path)
    return path


def params_of(path: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).parameters())


def train_once(work: Path, model: Path, data: Path, seq: int, name: str, extra: dict | None = None) -> dict:
    out = work / name
    keys = {"model_name_or_path": str(model), "stage": "pt", "dataset": str(data), "output_dir": str(out),
            "finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_target": "all",
            "cutoff_len": seq, "long_samples": "chunk", "per_device_train_batch_size": max(1, STEP_TOKENS // seq),
            "max_steps": 4, "learning_rate": 1e-4, "seed": 0, "logging_steps": 1, "save_steps": 100000,
            "report_to": "none", "plot_loss": False, "val_size": 0, "data_cache_dir": str(work / "cache"),
            "overwrite_output_dir": True, **(extra or {})}
    config = work / f"{name}.yaml"
    write_config(config, keys)
    _, rss = measure([sys.executable, "-m", "r1tune", "train", str(config)])
    result = json.loads((out / "eval_results.json").read_text())
    return {"tokens_s": result["train_tokens"] / result["train_runtime"], "rss": rss}


def flops_per_token(params: int, layers: int, hidden: int, seq: int) -> float:
    """4 x parameters (LoRA runs no weight-gradient matmuls for frozen weights) plus attention
    (12 x layers x hidden x mean context), per trained token."""
    return 4 * params + 12 * layers * hidden * seq / 2


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["model"] for r in rows if r["vocab"] is None):
        mine = [r for r in rows if r["model"] == name and r["vocab"] is None]
        speed.plot([r["seq"] for r in mine], [r["tokens_s"] for r in mine], marker="o", label=name)
        memory.plot([r["seq"] for r in mine], [r["rss"] for r in mine], marker="o", label=name)
    for axis, label in ((speed, "non-padding tokens/s"), (memory, "peak RSS (GB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length")
        axis.set_ylabel(label)
        axis.legend()
    fig.suptitle("r1tune LoRA training on a 2-core CPU, defaults")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="qwen2-4M at 256 and 1024 only")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of tokens/s and RSS vs length")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="r1tune-scaling-"))
    data = work / "text.jsonl"
    write_text(data)
    ceiling = matmul_ceiling("bf16")
    print(f"bf16 matmul ceiling {ceiling:,.0f} GFLOP/s; work in {work}")
    print(f"{'model':<12}{'params':>9}{'vocab':>9}{'seq':>6}{'loss':>9}{'tokens/s':>10}{'peak RSS':>10}{'FLOP/s':>9}")
    sizes = {"qwen2-4M": SIZES["qwen2-4M"]} if args.quick else SIZES
    rows = []
    for name, (hidden, layers) in sizes.items():
        model = build_model(work / name, hidden, layers)
        params = params_of(model)
        for seq in ((256, 1024) if args.quick else LENGTHS):
            rows.append(cell(work, model, data, name, params, hidden, layers, seq, ceiling))
    if not args.quick:
        hidden, layers = SIZES["qwen2-20M"]
        model = build_model(work / "qwen2-20M-vocab129k", hidden, layers, DEEPSEEK_VOCAB)
        params = params_of(model)
        for chunked in (True, False):
            rows.append(cell(work, model, data, "qwen2-20M", params, hidden, layers, 2048, ceiling,
                             vocab=DEEPSEEK_VOCAB, extra={"chunked_loss": chunked}))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    return 0


def cell(work, model, data, name, params, hidden, layers, seq, ceiling, vocab=None, extra=None) -> dict:
    """Train one (model, length) cell, print its row, return it."""
    loss = "" if vocab is None else ("chunked" if extra["chunked_loss"] else "full")
    row = {"model": name, "seq": seq, "vocab": vocab,
           **train_once(work, model, data, seq, f"{name}-{vocab or 'v'}-{seq}-{loss}", extra)}
    rate = row["tokens_s"] * flops_per_token(params, layers, hidden, seq) / 1e9
    print(f"{name:<12}{params / 1e6:>8.1f}M{(vocab or 'tiny'):>9}{seq:>6}{loss:>9}{row['tokens_s']:>10,.0f}"
          f"{row['rss']:>9.2f}G{rate / ceiling:>9.0%}", flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
