"""Preprocessing throughput and memory: r1tune's data pipeline vs LLaMA-Factory's, same file.

    python bench/data_throughput.py                      # 100k and 1M records
    python bench/data_throughput.py --records 20000      # quick look
    python bench/data_throughput.py --no-lf              # r1tune only (LLaMA-Factory is
                                                         # otherwise installed into .venv-lf)

Synthetic short alpaca records (an arithmetic question, a <think> line and an answer,
~40 tokens rendered) are written as JSONL. Each tool runs as a fresh process that reads
the file, applies the DeepSeek-R1 template, tokenizes, masks labels and writes its
tokenized data set to disk (r1tune: `r1tune data check` building its cache; LLaMA-Factory:
its `get_dataset` with `tokenized_path`, called as its trainer calls it, in its own
environment, stopping before any model is loaded). Wall time
minus the startup time (r1tune: the same command hitting its cache for a 100-record
file; LLaMA-Factory: the same command on a 100-record file) gives the preprocessing time; peak RSS is the sum over the process and its workers, sampled every
50 ms. A second r1tune run on the same file shows the cache hit. Run nothing else at the
same time: this machine has 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from configs import write_config  # noqa: E402
from lf_env import ensure_lf_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_records(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = rng.randint(0, 99999), rng.randint(0, 999)
            record = {"instruction": f"What is {a} plus {b}?", "input": "",
                      "output": f"<think>\nAdd {b} to {a}.\n</think>\n\n{a + b}"}
            f.write(json.dumps(record) + "\n")


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB summed over the process tree) of one command."""
    log = tempfile.TemporaryFile()  # not a pipe: a chatty tool would block on a full pipe
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        log.seek(0)
        raise RuntimeError(f"{cmd[0]} failed: {log.read().decode(errors='replace')[-3000:]}")
    return wall, peak / 2**20


TOKENIZER_ONLY = """
import json, sys, time
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = []
with open(sys.argv[2], encoding="utf-8") as f:
    for line in f:
        r = json.loads(line)
        texts.append(tok.apply_chat_template([{"role": "user", "content": r["instruction"]},
                                              {"role": "assistant", "content": r["output"]}], tokenize=False))
start = time.perf_counter()
tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
print(len(texts) / (time.perf_counter() - start))
"""


def tokenizer_floor(model: Path, data: Path) -> float:
    """Records/s of the Rust tokenizer alone on one thread, on the rendered records: an upper bound per core."""
    out = subprocess.run([sys.executable, "-c", TOKENIZER_ONLY, str(model), str(data)], capture_output=True,
                         text=True, check=True, env={**os.environ, "RAYON_NUM_THREADS": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def r1tune_command(work: Path, data: Path, model: Path, cache: Path, workers: int) -> list[str]:
    config = work / f"r1tune-{data.stem}-{workers}.yaml"
    keys = {"model_name_or_path": str(model), "dataset": str(data), "output_dir": str(work / "out"),
            "template": "deepseek_r1", "cutoff_len": 1024, "data_cache_dir": str(cache),
            "preprocessing_num_workers": workers}
    write_config(config, keys)
    return [sys.executable, "-m", "r1tune", "data", "check", str(config)]


def lf_command(lf_python: str, work: Path, data: Path, model: Path, workers: int) -> list[str]:
    folder = work / f"lf-{data.stem}"
    folder.mkdir(exist_ok=True)
    info = {"bench": {"file_name": str(data), "formatting": "alpaca"}}
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    keys = {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "dataset": "bench", "dataset_dir": str(folder), "template": "deepseekr1", "cutoff_len": 1024,
            "overwrite_cache": True, "tokenized_path": str(folder / f"tokenized-{time.time_ns()}"),
            "output_dir": str(folder / "out"), "use_cpu": True, "report_to": "none"}
    if workers > 1:
        keys["preprocessing_num_workers"] = workers
    return [lf_python, "-c", LF_PREPROCESS, json.dumps(keys)]


# LLaMA-Factory's own data path, stopped after the tokenized set is written (its CLI would
# go on to train): arguments, tokenizer + template, then get_dataset (tokenize, mask, save).
LF_PREPROCESS = """
import json, sys
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
model_args, data_args, training_args, finetuning_args, _ = get_train_args(json.loads(sys.argv[1]))
tokenizer_module = load_tokenizer(model_args)
template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
"""


def run(sizes: list[int], workers_list: list[int], lf_python: str | None) -> None:
    from r1tune.models.tiny import build_tiny

    work = Path(tempfile.mkdtemp(prefix="r1tune-bench-"))
    model = build_tiny(work / "model", "deepseek_v3", hidden_size=64, num_layers=1)
    small = work / "small.jsonl"
    write_records(small, 100)
    lf_env = {**os.environ, "DISABLE_VERSION_CHECK": "1", "CUDA_VISIBLE_DEVICES": ""}
    rows = []
    for n in sizes:
        data = work / f"records-{n}.jsonl"
        write_records(data, n)
        if n == sizes[0]:
            print(f"tokenizer alone, 1 thread (no rendering, labels or I/O): {tokenizer_floor(model, data):,.0f} records/s",
                  flush=True)
        for workers in workers_list:
            cache, small_cache = work / f"cache-{n}-{workers}", work / f"cache-small-{workers}"
            measure(r1tune_command(work, small, model, small_cache, workers))
            base, _ = measure(r1tune_command(work, small, model, small_cache, workers))  # startup only: a cache hit
            wall, rss = measure(r1tune_command(work, data, model, cache, workers))
            hit, hit_rss = measure(r1tune_command(work, data, model, cache, workers))
            rows.append(("r1tune", n, workers, wall - base, rss, hit - base))
            print_row(rows[-1])
            if lf_python:
                base, _ = measure(lf_command(lf_python, work, small, model, workers), lf_env)
                wall, rss = measure(lf_command(lf_python, work, data, model, workers), lf_env)
                rows.append(("LLaMA-Factory", n, workers, wall - base, rss, None))
                print_row(rows[-1])
    print(f"\nfiles and caches in {work}")


def print_row(row) -> None:
    tool, n, workers, seconds, rss, hit = row
    rate = n / max(seconds, 1e-9)
    hit_text = f", cache hit {hit:.1f} s" if hit is not None else ""
    print(f"{tool:<14} {n:>9,} records  workers {workers}  {seconds:7.1f} s  {rate:9,.0f} records/s  "
          f"{rate / max(workers, 1) if workers > 1 else rate:9,.0f} /s per worker  peak RSS {rss:7,.0f} MB{hit_text}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-lf", action="store_true", help="skip LLaMA-Factory (else installed into .venv-lf)")
    parser.add_argument("--lf-python", help="python of an existing environment with llamafactory")
    args = parser.parse_args()
    lf_python = None if args.no_lf else (args.lf_python or ensure_lf_env())
    run(args.records, args.workers, lf_python)


if __name__ == "__main__":
    main()
