"""Training throughput, memory and loss: r1tune vs TRL's SFTTrainer (+PEFT), same model, data and LoRA.

    python bench/train_throughput.py --quick      # < 3 min: tiny Qwen2, 160 records, r1tune vs TRL defaults;
                                                  # exits 1 if r1tune is below 1.5x TRL's tokens/s
    python bench/train_throughput.py              # qwen2 ~20M and deepseek_v3 ~20M on 400 records, qwen2 ~100M
                                                  # on 200 (the README's table; about 75 minutes)
    python bench/train_throughput.py --records 2000 --models qwen2-20M   # the issue's size (about an hour)

Every run trains one epoch over the same synthetic skewed-length alpaca records with LoRA
r=16, alpha=32 on r1tune's `lora_target: all` (TRL gets the same exact modules and fused expert
parameters; LLaMA-Factory `lora_target: all`), batch 8, cutoff 1,024, learning rate 1e-4, seed 0,
each tool with its own defaults otherwise (r1tune: `r1tune train`; TRL 1.16: `SFTTrainer` with
`SFTConfig` defaults, and `padding_free=True` as its best setting here; LLaMA-Factory 0.9.5:
`llamafactory-cli train` with template `deepseekr1`, skipped with its error if it fails). TRL runs in the
separate environments made by bench/lf_env.py (.venv-trl, .venv-lf).
Reported: training-loop seconds (each tool's own train_runtime), non-padding tokens/s (the
record set's token count under the DeepSeek-R1 template, the same for every tool), peak
RSS summed over the process tree, the last logged training loss, the loss on 64 held-out
records after the epoch (the same records for every run), and r1tune's model
FLOP/s (6 x parameters x tokens plus attention, and 4 x: LoRA skips the frozen weights'
gradient matmuls, so 6 overstates its work) against a 2048^3 bf16 matmul measured in the same run. Nothing else may run
at the same time: this machine has 2 cores.
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
from lf_env import ensure_lf_env, ensure_trl_env  # noqa: E402

MODELS = {"qwen2-20M": ("qwen2", 512, 6), "deepseek_v3-20M": ("deepseek_v3", 448, 6), "qwen2-100M": ("qwen2", 1024, 8)}
# TRL and LLaMA-Factory train at 80-500 tokens/s here, so the default sizes keep one run near an hour.
DEFAULT_RECORDS = {"qwen2-20M": 400, "deepseek_v3-20M": 400, "qwen2-100M": 200}
WORDS = ("the model reads each record and learns to answer with care while the data stays small "
         "模型 读取 每条 记录 并 学习 回答 数据 很 小 value price contract patient ticket refund").split()

TRL_SCRIPT = """
import json, sys
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer
a = json.loads(sys.argv[1])
rows = [json.loads(line) for line in open(a["data"], encoding="utf-8")]
data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"]}],
                           "completion": [{"role": "assistant", "content": r["output"]}]} for r in rows])
settings = dict(output_dir=a["out"], per_device_train_batch_size=8, max_length=1024, num_train_epochs=1,
                learning_rate=1e-4, use_cpu=True, report_to="none", logging_steps=5, save_strategy="no", seed=0)
config = SFTConfig(**{**settings, **a["extra"]})
# r1tune's exact targets (PEFT's "all-linear" on DeepSeek-V3 would adapt the router and drop the shared
# experts); PEFT's v4->v5 MoE rename is switched off as r1tune does, so the names are taken as given.
from peft.utils import transformers_weight_conversion
transformers_weight_conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
lora = LoraConfig(r=16, lora_alpha=32, target_modules=a["targets"]["modules"],
                  target_parameters=a["targets"]["parameters"] or None, task_type="CAUSAL_LM")
held = [json.loads(line) for line in open(a["eval"], encoding="utf-8")]
held = Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"]}],
                           "completion": [{"role": "assistant", "content": r["output"]}]} for r in held])
trainer = SFTTrainer(model=a["model"], args=config, train_dataset=data, eval_dataset=held, peft_config=lora)
metrics = trainer.train().metrics
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
eval_loss = trainer.evaluate()["eval_loss"]
print("RESULT " + json.dumps({"train_runtime": metrics["train_runtime"], "loss": losses[-1] if losses else None,
                              "eval_loss": eval_loss}))
"""


def write_records(path: Path, n: int, seed: int = 0) -> None:
    """Skewed lengths: most answers short, a tail of long ones (like real SFT data)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            size = rng.choice([20, 30, 40, 60, 80, 120, 200, 350])
            text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
            f.write(json.dumps({"instruction": text(rng.randint(8, 30)), "input": "", "output": text(size)}) + "\n")


def measure(cmd: list[str], env=None) -> tuple[str, float]:
    """(output, peak RSS GB summed over the process tree)."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.1)
    log.seek(0)
    text = log.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{text[-3000:]}")
    return text, peak / 2**30


def run_r1tune(work: Path, model: Path, data: Path, name: str, extra: dict | None = None,
               held_out: Path | None = None) -> dict:
    out = work / f"r1tune-{name}"
    keys = {"model_name_or_path": str(model), "dataset": str(data), "output_dir": str(out), "template": "deepseek_r1",
            "finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_target": "all",
            "per_device_train_batch_size": 8, "cutoff_len": 1024, "num_train_epochs": 1, "learning_rate": 1e-4,
            "seed": 0, "logging_steps": 5, "save_steps": 100000, "report_to": "none", "plot_loss": False,
            "data_cache_dir": str(work / "cache"), "overwrite_output_dir": True,
            **({"eval_dataset": str(held_out), "per_device_eval_batch_size": 8} if held_out else {}), **(extra or {})}
    config = work / f"r1tune-{name}.yaml"
    write_config(config, keys)
    _, rss = measure([sys.executable, "-m", "r1tune", "train", str(config)])
    result = json.loads((out / "eval_results.json").read_text())
    return {"seconds": result["train_runtime"], "tokens": result["train_tokens"], "rss": rss, "loss": result["train_loss"],
            "eval_loss": (result.get("after") or {}).get("eval_loss")}


def lora_targets(model_dir: Path) -> dict:
    """What r1tune's `lora_target: all` adapts on this model, as a PEFT regex of exact names + expert parameters."""
    import re

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from r1tune.models.methods import resolve_lora_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    targets = resolve_lora_targets(model, "all", include_experts=True)
    return {"modules": "|".join(re.escape(n) for n in targets.modules), "parameters": targets.parameters}


def run_trl(python: str, work: Path, model: Path, data: Path, name: str, extra: dict, held_out: Path) -> dict:
    args = {"model": str(model), "data": str(data), "eval": str(held_out), "out": str(work / f"trl-{name}"),
            "extra": extra, "targets": lora_targets(model)}
    text, rss = measure([python, "-c", TRL_SCRIPT, json.dumps(args)], env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    result = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    return {"seconds": result["train_runtime"], "rss": rss, "loss": result["loss"], "eval_loss": result["eval_loss"]}


def matmul_ceiling(dtype_name: str, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a square matmul in this process: the machine's practical ceiling."""
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def model_flops(model_dir: Path, tokens: int, records: int, per_param: int = 6) -> float:
    """per_param * parameters * tokens plus attention (12 * layers * hidden * mean sequence * tokens).

    6 is the usual count; LoRA skips the frozen weights' gradient matmuls, so 4 is what it runs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    mean_seq = tokens / max(records, 1)
    return per_param * params * tokens + 12 * config.num_hidden_layers * config.hidden_size * mean_seq * tokens


def run_lf(python: str, work: Path, model: Path, data: Path, name: str, held_out: Path) -> dict:
    """LLaMA-Factory's own trainer (`llamafactory-cli train`), its defaults, the same records and LoRA."""
    folder = work / f"lf-{name}"
    folder.mkdir(exist_ok=True)
    info = {"train": {"file_name": str(data)}, "held": {"file_name": str(held_out)}}
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    keys = {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "do_eval": True,
            "finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_target": "all",
            "dataset": "train", "eval_dataset": "held", "dataset_dir": str(folder), "template": "deepseekr1",
            "cutoff_len": 1024, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
            "learning_rate": 1e-4, "num_train_epochs": 1, "seed": 0, "logging_steps": 5, "save_strategy": "no",
            "output_dir": str(folder / "out"), "overwrite_output_dir": True, "overwrite_cache": True,
            "report_to": "none", "use_cpu": True}
    config = folder / "train.yaml"
    write_config(config, keys)
    cli = str(Path(python).parent / "llamafactory-cli")
    env = {**os.environ, "DISABLE_VERSION_CHECK": "1", "CUDA_VISIBLE_DEVICES": ""}
    _, rss = measure([cli, "train", str(config)], env=env)
    results = json.loads((folder / "out" / "all_results.json").read_text())
    state = json.loads((folder / "out" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    return {"seconds": results["train_runtime"], "rss": rss, "loss": losses[-1] if losses else None,
            "eval_loss": results.get("eval_loss")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="guard mode: tiny Qwen2, 160 records, exit 1 below 1.5x")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS))
    parser.add_argument("--r1tune", nargs="*", default=[], metavar="KEY=VALUE",
                        help="r1tune config overrides, e.g. gradient_checkpointing=true group_by_length=false")
    parser.add_argument("--no-compare", action="store_true", help="run r1tune only (no TRL / LLaMA-Factory)")
    args = parser.parse_args()
    from r1tune.models.tiny import build_tiny

    models = args.models or (["qwen2-20M"] if args.quick else list(MODELS))
    work = Path(tempfile.mkdtemp(prefix="r1tune-train-bench-"))
    held_out = work / "held_out.jsonl"
    write_records(held_out, 64, seed=1)  # the same held-out records score every run
    overrides = {k: json.loads(v) if v in ("true", "false") or v.replace(".", "").isdigit() else v
                 for k, v in (item.split("=", 1) for item in args.r1tune)}
    python = None if args.no_compare else ensure_trl_env()
    lf_python = None if args.quick or args.no_compare else ensure_lf_env()
    ceiling = matmul_ceiling("bf16")
    print(f"matmul ceiling: bf16 {ceiling:,.0f} GFLOP/s, fp32 {matmul_ceiling('fp32'):,.0f} GFLOP/s")
    worst = None
    for name in models:
        records = args.records or (160 if args.quick else DEFAULT_RECORDS[name])
        data = work / f"records-{records}.jsonl"
        if not data.exists():
            write_records(data, records)
        arch, hidden, layers = MODELS[("qwen2-20M" if args.quick else name)]
        if args.quick:
            hidden, layers = 256, 4
        model = build_tiny(work / name, arch, hidden_size=hidden, num_layers=layers)
        mine = run_r1tune(work, model, data, name, overrides, held_out=held_out)
        print(f"\n{name}: {records} records, {mine['tokens']:,} non-padding tokens, 1 epoch")
        for per_param, what in ((6, "6*N*tokens + attention"), (4, "4*N*tokens + attention, the matmuls LoRA runs")):
            rate = model_flops(model, mine["tokens"], records, per_param) / mine["seconds"] / 1e9
            print(f"r1tune model FLOP/s by {what}: {rate:,.1f} GFLOP/s = {rate / ceiling:.0%} of the bf16 "
                  f"matmul ceiling ({ceiling:,.0f} GFLOP/s)")
        print(f"{'run':<26}{'seconds':>9}{'tokens/s':>10}{'peak RSS':>10}{'last loss':>11}{'eval loss':>11}"
              f"{'r1tune speed-up':>17}")
        runs = [("r1tune (defaults)" if not overrides else "r1tune (" + " ".join(args.r1tune) + ")", lambda: mine)]
        if python:
            runs.append(("TRL (defaults)", lambda: run_trl(python, work, model, data, name, {}, held_out)))
            if not args.quick:
                runs.append(("TRL (padding_free)", lambda: run_trl(python, work, model, data, name,
                                                                   {"padding_free": True, "max_length": None},
                                                                   held_out)))
        if lf_python:
            runs.append(("LLaMA-Factory (defaults)", lambda: run_lf(lf_python, work, model, data, name, held_out)))
        for label, run in runs:
            try:
                row = run()
            except RuntimeError as exc:  # a comparison tool that fails is reported, not fatal
                print(f"{label}: skipped ({str(exc).splitlines()[-1][:200]})", flush=True)
                continue
            rate = mine["tokens"] / row["seconds"]
            ratio = (mine["tokens"] / mine["seconds"]) / rate
            print(f"{label:<26}{row['seconds']:>9.1f}{rate:>10,.0f}{row['rss']:>9.2f}G{row['loss'] or float('nan'):>11.3f}"
                  f"{row['eval_loss'] or float('nan'):>11.3f}{ratio:>16.2f}x", flush=True)
            if label == "TRL (defaults)":
                worst = ratio if worst is None else min(worst, ratio)
    print(f"\nfiles in {work}")
    if args.quick and worst is not None and worst < 1.5:
        print(f"GUARD FAILED: r1tune is {worst:.2f}x TRL's defaults (needs >= 1.5x)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
