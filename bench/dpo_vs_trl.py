"""DPO speed and memory: r1tune `stage: dpo` vs TRL's DPOTrainer + PEFT, same model, pairs and LoRA.

    python bench/dpo_vs_trl.py --quick                     # smoke test: 24 pairs, tiny Qwen2 (about 25 s)
    python bench/dpo_vs_trl.py                             # 400 pairs, tiny Qwen2 3.8M (about 2 minutes)
    python bench/dpo_vs_trl.py --arch deepseek_v3 --pairs 400   # tiny DeepSeek-V3 4.7M (about 3 minutes)

Both tools train one epoch over the same seeded preference pairs ({"instruction", "chosen", "rejected"};
prompts 10-100 tokens, answers 10-400 tokens, most short), on the same `r1tune tiny` model folder and
its DeepSeek-R1 chat template (TRL gets the pairs in conversational form), with LoRA r=16, alpha=32 on
the exact modules r1tune's `lora_target: all` picks (on Qwen2 these are PEFT's "all-linear"), sigmoid
loss, beta 0.1, batch 8, cutoff/max_length 1,024, the same learning rate and seed 0. Everything else is
each tool's default: r1tune decides bf16 itself; TRL 1.16's DPOConfig gets bf16 set to r1tune's choice,
use_cpu=True and keeps its defaults (gradient checkpointing on, precompute_ref_log_probs off). With LoRA
both take the reference from the base with the adapter switched off (one no-grad forward per batch).

Each tool runs once, in its own process, one after the other. Reported: pairs / training-loop seconds
(each tool's own train_runtime), the whole command's wall time (process start to exit: imports, model
load, tokenization, training, saving the adapter), peak RSS (the kernel's high-water mark of the
process, from wait4) and the peak of the sampled process-tree sum, and the training loss (mean over the
epoch and last logged value). Nothing else may run at the same time: this machine has 2 cores; the
"others" column shows the CPU-seconds the rest of the machine used during each run (a few at most, or
the timings are disturbed: a concurrent `r1tune train` made both tools 10-20x slower here).
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
from train_throughput import WORDS, lora_targets  # noqa: E402

LEARNING_RATE = 1e-5

TRL_SCRIPT = """
import json, resource, sys
from datasets import Dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer
a = json.loads(sys.argv[1])
rows = [json.loads(line) for line in open(a["data"], encoding="utf-8")]
data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"]}],
                           "chosen": [{"role": "assistant", "content": r["chosen"]}],
                           "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
config = DPOConfig(output_dir=a["out"], per_device_train_batch_size=8, num_train_epochs=1, max_length=1024,
                   beta=0.1, loss_type=["sigmoid"], learning_rate=a["lr"], logging_steps=10, report_to="none",
                   use_cpu=True, bf16=a["bf16"], save_strategy="no", seed=0)
# r1tune's exact targets; PEFT's v4->v5 MoE rename is switched off as r1tune does (names taken as given).
from peft.utils import transformers_weight_conversion
transformers_weight_conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
lora = LoraConfig(r=16, lora_alpha=32, target_modules=a["targets"]["modules"],
                  target_parameters=a["targets"]["parameters"] or None, task_type="CAUSAL_LM")
trainer = DPOTrainer(model=a["model"], args=config, train_dataset=data, peft_config=lora)
trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
metrics = trainer.train().metrics
trainer.save_model()
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print("RESULT " + json.dumps({"train_runtime": metrics["train_runtime"], "train_loss": metrics["train_loss"],
                              "last_loss": losses[-1] if losses else None, "steps": trainer.state.global_step,
                              "trainable": trainable, "bf16": config.bf16,
                              "gradient_checkpointing": config.gradient_checkpointing,
                              "dtype": str(trainer.model.dtype),
                              "pairs": len(trainer.train_dataset),
                              "tokens": max([h.get("num_tokens", 0) for h in trainer.state.log_history] + [0])}))
"""


def write_pairs(path: Path, n: int, tokenizer, seed: int = 0) -> dict:
    """Seeded pairs with skewed lengths (in tokens of the model's tokenizer); returns length stats."""
    rng = random.Random(seed)
    cost = {w: len(tokenizer(" " + w, add_special_tokens=False).input_ids) for w in WORDS}

    def text(tokens: int) -> str:
        words, used = [], 0
        while used < tokens:
            words.append(rng.choice(WORDS))
            used += cost[words[-1]]
        return " ".join(words)

    def answer_len() -> int:  # most answers short, a long tail up to 400 tokens
        return min(400, max(10, int(rng.lognormvariate(4.2, 0.8))))

    lengths = []
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            prompt = min(100, max(10, int(rng.lognormvariate(3.4, 0.6))))
            chosen, rejected = answer_len(), answer_len()
            record = {"instruction": text(prompt), "chosen": text(chosen), "rejected": text(rejected)}
            if record["chosen"] == record["rejected"]:
                record["rejected"] += " " + rng.choice(WORDS)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            lengths.append(prompt + max(chosen, rejected))
    lengths.sort()
    return {"mean": sum(lengths) / n, "p90": lengths[int(0.9 * (n - 1))], "max": lengths[-1]}


def measure(cmd: list[str], log: Path, env=None) -> dict:
    """Run cmd to exit: wall seconds, kernel peak RSS (GB, wait4) and sampled process-tree peak (GB)."""
    start, busy_before = time.perf_counter(), _busy_cpu_seconds()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    root, tree = psutil.Process(proc.pid), 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            tree = max(tree, sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - start
    others = _busy_cpu_seconds() - busy_before - usage.ru_utime - usage.ru_stime
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} exited {proc.returncode}:\n{text[-6000:]}")
    return {"wall": wall, "rss": usage.ru_maxrss * 1024 / 1e9, "tree": tree / 1e9, "text": text,
            "cpu": usage.ru_utime + usage.ru_stime, "others": others}


def _busy_cpu_seconds() -> float:
    """CPU-seconds the whole machine has been busy (all cores, all processes)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def run_r1tune(work: Path, model: Path, data: Path) -> dict:
    out = work / "r1tune-out"
    keys = {"model_name_or_path": str(model), "stage": "dpo", "dataset": str(data), "output_dir": str(out),
            "pref_loss": "sigmoid", "pref_beta": 0.1, "finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32,
            "lora_target": "all", "per_device_train_batch_size": 8, "num_train_epochs": 1, "cutoff_len": 1024,
            "learning_rate": LEARNING_RATE, "seed": 0, "val_size": 0, "logging_steps": 10, "report_to": "none",
            "data_cache_dir": str(work / "cache"), "overwrite_output_dir": True}
    config = write_config(work / "r1tune-dpo.yaml", keys)
    row = measure([sys.executable, "-m", "r1tune", "train", str(config)], work / "r1tune.log")
    result = json.loads((out / "eval_results.json").read_text())
    logged = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    logged = [entry for entry in logged if entry.get("split") == "train" and "loss" in entry]
    # eval_results' train_loss is the last logged window; the epoch mean weights each window by its steps
    spans = [entry["step"] - before for entry, before in zip(logged, [0] + [e["step"] for e in logged])]
    mean = sum(e["loss"] * n for e, n in zip(logged, spans)) / sum(spans) if logged else None
    row.update(seconds=result["train_runtime"], steps=result.get("global_step"), loss=mean,
               last=logged[-1]["loss"] if logged else None, results=result)
    return row


def run_trl(work: Path, model: Path, data: Path, bf16: bool) -> dict:
    args = {"model": str(model), "data": str(data), "out": str(work / "trl-out"), "lr": LEARNING_RATE,
            "bf16": bf16, "targets": lora_targets(model)}
    row = measure([sys.executable, "-c", TRL_SCRIPT, json.dumps(args)], work / "trl.log",
                  env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    result = json.loads(row["text"].split("RESULT ", 1)[1].splitlines()[0])
    row.update(seconds=result["train_runtime"], steps=result["steps"], loss=result["train_loss"],
               last=result["last_loss"], results=result)
    return row


def r1tune_bf16(row: dict) -> bool:
    """What r1tune chose: its "speed:" line (e.g. "speed: bf16 autocast, ..."), else its documented CPU rule."""
    for line in row["text"].splitlines():
        if line.startswith("speed:"):
            return "bf16" in line.split(",")[0]
    from r1tune.envinfo import cpu_bf16

    return cpu_bf16()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=None, help="preference pairs (default 400; --quick 24)")
    parser.add_argument("--arch", choices=("qwen2", "deepseek_v3"), default="qwen2")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="smoke test: 24 pairs")
    args = parser.parse_args()
    pairs = args.pairs or (24 if args.quick else 400)

    from transformers import AutoTokenizer

    from r1tune.envinfo import cpu_features
    from r1tune.models.tiny import build_tiny

    print(cpu_features())
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    work = Path(tempfile.mkdtemp(prefix="r1tune-dpo-bench-"))
    model = build_tiny(work / f"tiny-{args.arch}", args.arch, hidden_size=args.hidden_size, num_layers=args.layers)
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = work / "pairs.jsonl"
    stats = write_pairs(data, pairs, tokenizer)
    params = _params(model)
    print(f"model: tiny {args.arch}, hidden {args.hidden_size}, {args.layers} layers, {params / 1e6:.1f}M parameters; "
          f"{pairs} pairs, prompt + longer answer: mean {stats['mean']:.0f}, p90 {stats['p90']}, "
          f"max {stats['max']} tokens; LoRA r16/alpha32 on {len(lora_targets(model)['modules'].split('|'))} "
          f"modules; batch 8, cutoff 1024, 1 epoch, lr {LEARNING_RATE:g}", flush=True)

    busy = other_cpu_users()
    if busy:
        print(f"WARNING: other processes are using the CPU, timings will be off: {busy}", flush=True)
    rows = {}
    try:
        rows["r1tune"] = run_r1tune(work, model, data)
    except RuntimeError as exc:
        print(f"r1tune failed:\n{exc}")
        return 1
    bf16 = r1tune_bf16(rows["r1tune"])
    print(f"r1tune precision: bf16={bf16} ({_precision_lines(rows['r1tune']['text'])})", flush=True)
    try:
        rows["TRL"] = run_trl(work, model, data, bf16)
        r = rows["TRL"]["results"]
        print(f"TRL precision: bf16={r['bf16']} (weights {r['dtype']}), gradient_checkpointing="
              f"{r['gradient_checkpointing']}; trainable parameters {r['trainable']:,}; pairs after TRL's "
              f"filter {r['pairs']}", flush=True)
    except RuntimeError as exc:
        print(f"TRL failed:\n{exc}")

    print(f"\n{'tool':<8}{'pairs':>6}{'steps':>6}{'loop s':>9}{'pairs/s':>9}{'command s':>11}{'peak RSS':>10}"
          f"{'tree RSS':>10}{'epoch loss':>11}{'last loss':>11}{'CPU s':>8}{'others':>8}")
    for name, row in rows.items():
        print(f"{name:<8}{pairs:>6}{row['steps'] or 0:>6}{row['seconds']:>9.1f}{pairs / row['seconds']:>9.2f}"
              f"{row['wall']:>11.1f}{row['rss']:>9.2f}G{row['tree']:>9.2f}G{_num(row['loss']):>11.4f}"
              f"{_num(row['last']):>11.4f}{row['cpu']:>8.0f}{row['others']:>8.0f}")
    print("CPU s: the run's own CPU-seconds; others: CPU-seconds everything else on the machine used meanwhile "
          "(more than a few means the timings are disturbed)")
    tokens = {"r1tune": rows["r1tune"]["results"].get("train_tokens"),
              "TRL": rows["TRL"]["results"].get("tokens") if "TRL" in rows else None}
    print("tokens in the epoch (prompt + answer rows, no padding): " + ", ".join(f"{k} {int(v):,}" for k, v in tokens.items() if v))
    if "TRL" in rows:
        mine, theirs = rows["r1tune"], rows["TRL"]
        print(f"\nr1tune / TRL: pairs/s {theirs['seconds'] / mine['seconds']:.2f}x (goal >= 2x), "
              f"whole command {theirs['wall'] / mine['wall']:.2f}x faster, "
              f"peak RSS {mine['rss'] / theirs['rss']:.2f}x (goal <= 0.5x), "
              f"tree RSS {mine['tree'] / theirs['tree']:.2f}x")
    print(f"\nfiles in {work} (r1tune.log, trl.log, r1tune-dpo.yaml, pairs.jsonl)")
    return 0


def _params(model: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())


def _precision_lines(text: str) -> str:
    hits = [line.strip() for line in text.splitlines()
            if line.startswith("speed:")]
    return "; ".join(hits[:3]) or "no precision line in its log"


def other_cpu_users(seconds: float = 2.0) -> list[str]:
    """Processes (not this one) above 20% of a core over a short window: they would skew the timings."""
    procs = [p for p in psutil.process_iter() if p.pid != os.getpid()]
    for p in procs:
        try:
            p.cpu_percent()
        except psutil.Error:
            pass
    time.sleep(seconds)
    busy = []
    for p in procs:
        try:
            share = p.cpu_percent()
            if share > 20:
                busy.append(f"pid {p.pid} {' '.join(p.cmdline())[:80]} {share:.0f}%")
        except psutil.Error:
            pass
    return busy


def _num(value) -> float:
    return float("nan") if value is None else float(value)


if __name__ == "__main__":
    sys.exit(main())
