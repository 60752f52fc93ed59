"""How preference pairs are batched: packed rows, the micro-batch budget, the reference model.

    python bench/pair_batches.py --packing                  # token positions of one epoch, packed vs not (~1 min)
    python bench/pair_batches.py --budgets 1536 3072        # DPO epoch seconds per micro_batch_tokens
    python bench/pair_batches.py --budgets 1536 3072 --stage sft   # the same pairs as SFT records
    python bench/pair_batches.py --reference                # adapter off vs precompute_ref_log_probs: true

Same model, pairs and keys as bench/dpo_vs_trl.py's r1tune side (tiny Qwen2 3.8M, 400 pairs, LoRA r16,
batch 8, one epoch). SFT records are the instruction with "chosen rejected" as the answer. Timed
variants run as `r1tune train` processes alternated round by round (--rounds), so drift on this
2-core machine hits them alike; each prints its train_runtime. Nothing else may run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from configs import write_config  # noqa: E402
from dpo_vs_trl import LEARNING_RATE, write_pairs  # noqa: E402


def base_keys(work: Path, model: Path, data: Path, stage: str) -> dict:
    keys = {"model_name_or_path": str(model), "stage": stage, "dataset": str(data), "output_dir": str(work / "out"),
            "finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_target": "all",
            "per_device_train_batch_size": 8, "num_train_epochs": 1, "cutoff_len": 1024,
            "learning_rate": LEARNING_RATE, "seed": 0, "val_size": 0, "logging_steps": 10, "report_to": "none",
            "data_cache_dir": str(work / "cache"), "overwrite_output_dir": True}
    return {**keys, "pref_loss": "sigmoid", "pref_beta": 0.1} if stage == "dpo" else keys


def sft_records(pairs: Path, out: Path) -> Path:
    with open(out, "w", encoding="utf-8") as f:
        for line in pairs.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            f.write(json.dumps({"instruction": r["instruction"], "output": f"{r['chosen']} {r['rejected']}"}) + "\n")
    return out


def packing_positions(keys: dict) -> None:
    """One epoch in this process per mode, counting what the pair stage's collate hands the model."""
    from r1tune.config import validate_config
    from r1tune.train import preference_stage
    from r1tune.train.stages.registry import run_stage

    original = preference_stage._RowsStage.collate_rows
    counts = {"positions": 0, "real": 0}

    def counting(self, items):
        batch = original(self, items)
        counts["positions"] += batch["input_ids"].numel()
        counts["real"] += int(batch["num_tokens"])
        return batch

    preference_stage._RowsStage.collate_rows = counting
    print(f"{'mode':<10}{'token positions':>17}{'real tokens':>13}{'real share':>12}")
    for packs in (True, False):
        preference_stage.DPOLoss.packs = packs
        counts.update(positions=0, real=0)
        run_stage(validate_config(keys))
        print(f"{'packed' if packs else 'unpacked':<10}{counts['positions']:>17,}{counts['real']:>13,}"
              f"{counts['real'] / counts['positions']:>12.3f}", flush=True)


def timed(work: Path, variants: dict[str, dict], rounds: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, keys in variants.items():
            config = write_config(work / f"{name.replace(' ', '_')}.yaml", keys)
            subprocess.run([sys.executable, "-m", "r1tune", "train", str(config)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result = json.loads((Path(keys["output_dir"]) / "eval_results.json").read_text())
            times[name].append(result["train_runtime"])
            print(f"{name}: {result['train_runtime']:.1f} s", flush=True)
    print("\n" + "\n".join(f"{name:<28}{' / '.join(f'{t:.1f}' for t in ts)} s" for name, ts in times.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packing", action="store_true", help="count token positions, packed vs unpacked")
    parser.add_argument("--budgets", type=int, nargs="*", default=[], help="micro_batch_tokens values to time")
    parser.add_argument("--reference", action="store_true", help="time adapter-off vs precomputed reference")
    parser.add_argument("--stage", choices=("dpo", "sft"), default="dpo", help="for --budgets")
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from r1tune.envinfo import cpu_features
    from r1tune.models.tiny import build_tiny

    print(cpu_features())
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="r1tune-pair-batches-"))
    model = build_tiny(work / "tiny-qwen2", "qwen2", hidden_size=256, num_layers=4)
    pairs = work / "pairs.jsonl"
    write_pairs(pairs, args.pairs, AutoTokenizer.from_pretrained(model))
    dpo = base_keys(work, model, pairs, "dpo")
    if args.packing:
        packing_positions(dpo)
    if args.budgets:
        data = pairs if args.stage == "dpo" else sft_records(pairs, work / "sft.jsonl")
        keys = base_keys(work, model, data, args.stage)
        timed(work, {f"{args.stage} {b} tokens": {**keys, "micro_batch_tokens": b} for b in args.budgets}, args.rounds)
    if args.reference:
        timed(work, {"adapter off": dpo, "precomputed": {**dpo, "precompute_ref_log_probs": True}}, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
