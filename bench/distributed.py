"""One process vs two on this machine: speed (same global batch) and memory per process by strategy.

    python bench/distributed.py            # both parts (about 3 minutes)
    python bench/distributed.py --quick    # fewer steps, smaller memory model

Part 1, speed: SFT with LoRA on the quickstart data, tiny Qwen2 (hidden 256, 4 layers, 3.8M), global batch 16
(1 process x 16, or 2 processes x 8), the same steps. Efficiency = (2-process steps/s) / (2 x 1-process steps/s).
This machine has 2 cores: one process already uses both (2 intra-op threads), two processes get one core each,
so the ideal speed-up here is about 1x, not 2x; the figure shows what splitting a step across processes costs
(summing gradients, equal micro-batches), not what 2 GPUs would gain.

Part 2, memory: full fine-tuning (fp32 weights, AdamW) of a ~100M Qwen2 (hidden 768, 14 layers), 2 steps, as 1
process, 2 processes with plain data parallelism, FSDP full_shard and FSDP shard_grad_op; each process's peak RSS
(eval_results.json peak_memory_gb). The model states predicted per process (docs/distributed.md): weights 4P,
gradients 4P, Adam 8P bytes; full_shard divides all three by the processes, shard_grad_op keeps the weights whole
between forward and backward (4P + 12P / N). The process's fixed part (torch and transformers imports, activations)
is the same in every row, so the bench compares differences between rows with the differences predicted.
The memory part runs twice: as is, and with MALLOC_MMAP_THRESHOLD_=65536 (glibc then returns large freed
blocks to the system at once; by default it keeps them, so a process's RSS stays at the most it ever held, and
FSDP's per-layer gather buffers, freed after each use, show as held). Nothing else may run at the same time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from configs import write_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(config: Path, processes: int, extra_env: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_TORCHRUN", "NPROC_PER_NODE")}
    env.update(extra_env or {})
    if processes > 1:
        env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE=str(processes))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "r1tune", "train", str(config)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"r1tune train {config.name} failed:\n{done.stderr[-4000:]}")
    result = json.loads((Path(_output_dir(config)) / "eval_results.json").read_text(encoding="utf-8"))
    result["wall"] = time.perf_counter() - start
    return result


def _output_dir(config: Path) -> str:
    for line in config.read_text(encoding="utf-8").splitlines():
        if line.startswith("output_dir:"):
            return json.loads(line.split(":", 1)[1])
    raise ValueError(config)


def keys(model: Path, data: Path, out: Path, **extra) -> dict:
    base = {"model_name_or_path": str(model), "dataset": str(data), "output_dir": str(out), "cutoff_len": 256,
            "logging_steps": 1000, "save_steps": 100000, "report_to": "none", "plot_loss": False, "seed": 0,
            "val_size": 0, "update_heatmap": False, "overwrite_output_dir": True, "learning_rate": 1e-4}
    return {**base, **extra}


def speed(work: Path, steps: int) -> None:
    from r1tune.models.tiny import build_tiny

    model = build_tiny(work / "tiny", "qwen2", hidden_size=256, num_layers=4)
    data = ROOT / "examples" / "data" / "parity.jsonl"
    rows = []
    for processes in (1, 2):
        config = write_config(work / f"speed{processes}.yaml", keys(
            model, data, work / f"speed{processes}", per_device_train_batch_size=16 // processes, max_steps=steps))
        result = run(config, processes)
        rows.append((processes, steps / result["train_runtime"], result["train_loss"], result["wall"]))
    (_, one, loss1, wall1), (_, two, loss2, wall2) = rows
    print(f"speed, SFT LoRA, tiny Qwen2 3.8M, global batch 16, {steps} steps:")
    print(f"  1 process : {one:6.2f} steps/s (loop), whole command {wall1:5.1f} s, last loss {loss1:.4f}")
    print(f"  2 processes: {two:6.2f} steps/s (loop), whole command {wall2:5.1f} s, last loss {loss2:.4f}")
    print(f"  speed-up {two / one:.2f}x, efficiency {two / (2 * one):.0%} (2 cores in all: about 1x is the ceiling here)")


def memory(work: Path, hidden: int, layers: int, extra_env: dict | None = None) -> None:
    from r1tune.models.tiny import build_tiny

    model = build_tiny(work / "mid", "qwen2", hidden_size=hidden, num_layers=layers)
    config = json.loads((model / "config.json").read_text())
    params = _count_params(model)
    data = ROOT / "examples" / "data" / "parity.jsonl"
    cases = [("1 process", 1, {}), ("2 processes, data parallel", 2, {}),
             ("2 processes, fsdp full_shard", 2, {"fsdp": "full_shard auto_wrap"}),
             ("2 processes, fsdp shard_grad_op", 2, {"fsdp": "shard_grad_op auto_wrap"})]
    predicted = {"1 process": 16 * params, "2 processes, data parallel": 16 * params,
                 "2 processes, fsdp full_shard": 16 * params / 2, "2 processes, fsdp shard_grad_op": 4 * params + 12 * params / 2}
    if importlib.util.find_spec("deepspeed"):
        examples = ROOT / "examples" / "distributed"
        cases += [("2 processes, deepspeed ZeRO-2", 2, {"deepspeed": str(examples / "ds_z2_config.json")}),
                  ("2 processes, deepspeed ZeRO-3", 2, {"deepspeed": str(examples / "ds_z3_config.json")})]
        predicted.update({"2 processes, deepspeed ZeRO-2": 4 * params + 12 * params / 2,
                          "2 processes, deepspeed ZeRO-3": 16 * params / 2})
    print(f"memory, full fine-tuning (fp32 + AdamW), Qwen2 hidden {config['hidden_size']}, {layers} layers, "
          f"{params / 1e6:.0f}M parameters, 2 steps{', ' + ' '.join(f'{k}={v}' for k, v in extra_env.items()) if extra_env else ''}:")
    base = None
    for name, processes, extra in cases:
        slug = name.replace(" ", "_").replace(",", "")
        cfg = write_config(work / f"{slug}.yaml", keys(model, data, work / slug, finetuning_type="full",
                                                      per_device_train_batch_size=8 // processes, max_steps=2,
                                                      bf16=False, **extra))
        peaks = run(cfg, processes, extra_env)["peak_memory_gb"]
        peak = max(peaks)
        if base is None:
            base = (peak, predicted[name])
        measured_diff, predicted_diff = peak - base[0], (predicted[name] - base[1]) / 1e9
        print(f"  {name:33s} peak per process {', '.join(f'{p:.2f}' for p in peaks):12s} GB; model states predicted "
              f"{predicted[name] / 1e9:.2f} GB; vs 1 process: measured {measured_diff:+.2f} GB, predicted {predicted_diff:+.2f} GB")


# Model-state bytes per parameter in r1tune's layout: fp32 weights (4), fp32 gradients (4), AdamW's two fp32
# moments (8); LoRA trains a negligible share, so only its frozen fp32 weights count.
SIZES = [("R1-Distill-Qwen-1.5B", 1.8e9), ("R1-Distill-Qwen-7B", 7.6e9), ("R1-Distill-Qwen-14B", 14.8e9),
         ("R1-Distill-Qwen-32B", 32.8e9), ("R1-Distill-Llama-70B", 70.6e9), ("DeepSeek-R1 (671B MoE)", 671e9)]


def model_state_gb(params: float, strategy: str, processes: int, full: bool = True) -> float:
    """Per process (GPU memory; CPU RAM for the offloaded part is not counted), GB."""
    n = processes
    if not full:  # LoRA: the frozen weights (sharded by full_shard / ZeRO-3)
        return params * 4 / (n if strategy in ("full_shard / ZeRO-3", "ZeRO-3 + offload") else 1) / 1e9 \
            * (0 if strategy == "ZeRO-3 + offload" else 1)
    per_param = {"data parallel": 16, "shard_grad_op / ZeRO-2": 4 + 12 / n, "full_shard / ZeRO-3": 16 / n,
                 "ZeRO-2 + offload": 4 + 4 / n, "ZeRO-3 + offload": 0}[strategy]
    return params * per_param / 1e9


def plan_table(processes: int = 8) -> None:
    strategies = ["data parallel", "shard_grad_op / ZeRO-2", "ZeRO-2 + offload", "full_shard / ZeRO-3", "ZeRO-3 + offload"]
    print(f"model states per GPU, {processes} GPUs, full fine-tuning (GB; fp32 weights + gradients + AdamW):")
    print("| model | params | " + " | ".join(strategies) + " | LoRA, data parallel | LoRA, full_shard / ZeRO-3 |")
    print("|---" * (len(strategies) + 4) + "|")
    for name, params in SIZES:
        cells = [f"{model_state_gb(params, s, processes):,.0f}" for s in strategies]
        lora = [f"{model_state_gb(params, s, processes, full=False):,.0f}" for s in ("data parallel", "full_shard / ZeRO-3")]
        print(f"| {name} | {params / 1e9:g}B | " + " | ".join(cells + lora) + " |")


def _count_params(model: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in model.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                total += _numel(f.get_slice(name).get_shape())
    return total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from r1tune.envinfo import cpu_features

    print(cpu_features())
    plan_table()
    work = Path(tempfile.mkdtemp(prefix="r1tune-dist-bench-"))
    os.environ.setdefault("R1TUNE_CACHE", str(work / "cache"))
    speed(work, 8 if args.quick else 30)
    size = (256, 4) if args.quick else (768, 14)
    memory(work, *size)
    # glibc keeps freed blocks for reuse, so RSS shows the most ever allocated; a fixed mmap threshold returns
    # large freed blocks to the system, which is closer to what a GPU's caching allocator reports
    memory(work, *size, {"MALLOC_MMAP_THRESHOLD_": "65536"})
    print(f"files in {work}")


if __name__ == "__main__":
    main()
