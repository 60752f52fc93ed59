"""Peak RSS and speed of whole `r1tune train` runs at several oneDNN primitive cache capacities.

    python bench/onednn_cache.py                               # 20M DeepSeek-V3 and 20M Qwen2, 400 records
    python bench/onednn_cache.py --models qwen2-100M --records 200 --capacities 1024 32

Each run is bench/train_throughput.py's r1tune run (same records, LoRA, batch, cutoff) with
ONEDNN_PRIMITIVE_CACHE_CAPACITY set for the child process; 1,024 is oneDNN's default, 32 is
r1tune's (src/r1tune/train/memory.py). Runs of one model follow each other, so compare the
rows of one model; the seconds drift about 10 % between runs on this shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import DEFAULT_RECORDS, MODELS, run_r1tune, write_records  # noqa: E402

ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deepseek_v3-20M", "qwen2-20M"], choices=sorted(MODELS))
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--capacities", nargs="+", type=int, default=[1024, 32, 8])
    args = parser.parse_args()
    from r1tune.models.tiny import build_tiny

    work = Path(tempfile.mkdtemp(prefix="r1tune-onednn-bench-"))
    held_out = work / "held_out.jsonl"
    write_records(held_out, 64, seed=1)
    print(f"{'model':<18}{'capacity':>9}{'seconds':>9}{'tokens/s':>10}{'peak RSS':>10}{'eval loss':>11}")
    for name in args.models:
        records = args.records or DEFAULT_RECORDS[name]
        data = work / f"records-{records}.jsonl"
        if not data.exists():
            write_records(data, records)
        arch, hidden, layers = MODELS[name]
        model = build_tiny(work / name, arch, hidden_size=hidden, num_layers=layers)
        for capacity in args.capacities:
            os.environ[ENV] = str(capacity)
            row = run_r1tune(work, model, data, f"{name}-{capacity}", held_out=held_out)
            print(f"{name:<18}{capacity:>9}{row['seconds']:>9.1f}{row['tokens'] / row['seconds']:>10,.0f}"
                  f"{row['rss']:>9.2f}G{row['eval_loss']:>11.3f}", flush=True)
    print(f"files in {work}")


if __name__ == "__main__":
    main()
