"""GRPO speed and memory: r1tune `stage: grpo` vs TRL's GRPOTrainer + PEFT, same model, prompts, rewards and LoRA.

    python bench/grpo_vs_trl.py --quick               # smoke test: 4 steps x 8 completions (2 x 4), 16 tokens (about 20 s)
    python bench/grpo_vs_trl.py                       # 20 steps x 16 completions (2 x 8), 64 tokens, tiny Qwen2 3.8M
    python bench/grpo_vs_trl.py --arch deepseek_v3    # the same on a tiny DeepSeek-V3 (4.7M)
    python bench/grpo_vs_trl.py --trl-no-checkpointing   # TRL without its default gradient checkpointing

Both tools run the same number of optimizer steps over the same seeded arithmetic prompts ("What is 17 + 5?"
style, one epoch: each prompt is used once), on the same `r1tune tiny` model folder and its DeepSeek-R1 chat
template (r1tune gets {"instruction", "answer"} records, TRL the same instructions as conversational {"prompt":
[{"role": "user", ...}]} records; the bench checks that both render the same prompt text and tokens). Settings
shared by both: num_generations completions per prompt, per_device_train_batch_size counting completions (batch
/ num_generations prompts per step), gradient_accumulation_steps 1, max_completion_length, temperature 1.0,
top_p 1.0 (TRL's top_k 0: off), loss_type dapo, beta 0 (no reference model), num_iterations 1, epsilon 0.2,
scale_rewards group, LoRA r=16, alpha=32, dropout 0 on the exact modules r1tune's `lora_target: all` picks, the
same learning rate with a linear schedule and no warmup, max_grad_norm 1, seed 0, a log every step, and one
reward function: a file the bench writes, `reward(prompts, completions, **kwargs)` (TRL's calling convention)
scoring the share of a completion's non-space characters that are ASCII, digits and arithmetic signs counting
double (the tiny random model writes a mix of English and Chinese pieces, so it varies within each group), read
from plain-text (r1tune) and conversational (TRL) completions alike; r1tune loads it through `reward_funcs:
[file.py:reward]`, TRL gets the function itself. Rollouts are sampled (the tiny random model rarely emits its
EOS, so most completions run to max_completion_length on both sides: the mean completion length is printed to
show it).

What differs is each tool's own defaults: r1tune decides bf16 itself (bf16 autocast where the CPU has native
bf16 matmuls) and whether to checkpoint activations (off at these sizes); TRL 1.16's GRPOConfig gets bf16 set to
r1tune's choice (fp32 weights, the loss under bf16 autocast, as r1tune; TRL's rollouts run outside the autocast,
in fp32, while r1tune's run under it), use_cpu=True and keeps its other defaults: gradient checkpointing on
(TRL's GRPO default; --trl-no-checkpointing turns it off to see how much of the gap it is), generation through
transformers' generate with a fresh KV cache per batch (no vLLM, no continuous batching), shuffle on,
log_completions off. r1tune decodes its rollouts with its own batched KV-cache decoder and cuts training batches
into micro-batches by its token budget (its default); it writes a few completions per log to completions.jsonl
(its default, used here to check the rendered prompts). Sampling is seeded on both sides but the tools draw
differently, so the completions (and rewards) are not token-for-token equal: the mean reward only shows both
trained the same task.

Each tool runs once, in its own process, one after the other. Reported: optimizer steps per second of the
training loop (each tool's own train_runtime: rollouts, rewards and updates; r1tune's from eval_results.json,
TRL's from trainer.train()), the whole command's wall time (process start to exit: imports, model load,
tokenization, training, saving the adapter), peak RSS (the kernel's high-water mark of the process, from wait4)
and the peak of the sampled process-tree sum, the mean reward over the logged steps (and of the last step) and
the mean completion length. Nothing else may run at the same time: this machine has 2 cores; the "others" column
shows the CPU-seconds the rest of the machine used during each run (a few at most, or the timings are disturbed:
a concurrent `r1tune train` made both tools 10-20x slower here).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from configs import write_config  # noqa: E402
from dpo_vs_trl import _num, _params, _precision_lines, measure, other_cpu_users, r1tune_bf16  # noqa: E402
from train_throughput import lora_targets  # noqa: E402

LEARNING_RATE = 1e-3  # LoRA on a random tiny model: large enough for the reward to move in 20 steps

REWARD_FILE = '''"""The bench's reward (TRL's calling convention): the share of a completion's non-space characters
that are ASCII, digits and arithmetic signs counting double (score in [0, 1]; 0 for an empty completion)."""

SIGNS = set("0123456789+-*/=")


def reward(prompts, completions, **kwargs):
    scores = []
    for completion in completions:
        text = completion[-1]["content"] if isinstance(completion, list) else completion  # conversational or text
        chars = [c for c in text if not c.isspace()]
        points = sum((c in SIGNS) + (ord(c) < 128) for c in chars)
        scores.append(points / (2 * len(chars)) if chars else 0.0)
    return scores
'''

TRL_SCRIPT = """
import importlib.util, json, sys
from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer
a = json.loads(sys.argv[1])
spec = importlib.util.spec_from_file_location("bench_reward", a["reward_file"])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
rows = [json.loads(line) for line in open(a["data"], encoding="utf-8")]
data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"]}], "answer": r["answer"]}
                          for r in rows])
extra = {"gradient_checkpointing": False} if a["no_checkpointing"] else {}
config = GRPOConfig(output_dir=a["out"], per_device_train_batch_size=a["batch"], gradient_accumulation_steps=1,
                    num_generations=a["generations"], max_completion_length=a["completion"], temperature=1.0,
                    top_p=1.0, beta=0.0, loss_type="dapo", num_iterations=1, epsilon=0.2, scale_rewards="group",
                    max_steps=a["steps"], learning_rate=a["lr"], lr_scheduler_type="linear", warmup_steps=0,
                    max_grad_norm=1.0, logging_steps=1, report_to="none", use_cpu=True, bf16=a["bf16"],
                    save_strategy="no", seed=0, **extra)
# r1tune's exact targets; PEFT's v4->v5 MoE rename is switched off as r1tune does (names taken as given).
from peft.utils import transformers_weight_conversion
transformers_weight_conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=a["targets"]["modules"],
                  target_parameters=a["targets"]["parameters"] or None, task_type="CAUSAL_LM")
trainer = GRPOTrainer(model=a["model"], reward_funcs=module.reward, args=config, train_dataset=data,
                      peft_config=lora)
trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
metrics = trainer.train().metrics
trainer.save_model()
logged = [h for h in trainer.state.log_history if "reward" in h]
render = lambda r: trainer.processing_class.apply_chat_template(
    [{"role": "user", "content": r["instruction"]}], add_generation_prompt=True, tokenize=False,
    **trainer.chat_template_kwargs)
ids = trainer.processing_class.apply_chat_template([{"role": "user", "content": rows[0]["instruction"]}],
                                                   add_generation_prompt=True, tokenize=True, return_dict=True,
                                                   **trainer.chat_template_kwargs)["input_ids"]
print("RESULT " + json.dumps({"train_runtime": metrics["train_runtime"], "steps": trainer.state.global_step,
                              "rewards": [h["reward"] for h in logged],
                              "lengths": [h.get("completions/mean_length") for h in logged],
                              "trainable": trainable, "bf16": config.bf16,
                              "gradient_checkpointing": config.gradient_checkpointing,
                              "generation_batch_size": config.generation_batch_size,
                              "dtype": str(trainer.model.dtype),
                              "rendered": {r["instruction"]: render(r) for r in rows},
                              "first_ids": list(ids[0] if ids and isinstance(ids[0], list) else ids)}))
"""


def write_prompts(path: Path, n: int, seed: int = 0) -> list[dict]:
    """Seeded arithmetic instructions ({"instruction", "answer"}): one to three operations, a few phrasings."""
    rng = random.Random(seed)
    phrasings = ["What is {}?", "Compute {}.", "Calculate {} and give the result.",
                 "Please work out {} step by step, then write the final number.", "{} = ?"]
    records = []
    for _ in range(n):
        terms = [str(rng.randint(1, 99))]
        for _ in range(rng.randint(1, 3)):
            terms += [rng.choice("+-*"), str(rng.randint(1, 99))]
        expression = " ".join(terms)
        records.append({"instruction": rng.choice(phrasings).format(expression),
                        "answer": str(eval(expression))})  # noqa: S307 - our own digits and + - * only
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return records


def run_r1tune(work: Path, model: Path, data: Path, reward: Path, a: argparse.Namespace) -> dict:
    out = work / "r1tune-out"
    keys = {"model_name_or_path": str(model), "stage": "grpo", "dataset": str(data), "output_dir": str(out),
            "reward_funcs": [f"{reward}:reward"], "num_generations": a.num_generations,
            "max_completion_length": a.max_completion_length, "temperature": 1.0, "top_p": 1.0, "beta": 0.0,
            "loss_type": "dapo", "num_iterations": 1, "epsilon": 0.2, "scale_rewards": "group",
            "finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target": "all",
            "per_device_train_batch_size": a.batch, "gradient_accumulation_steps": 1, "max_steps": a.steps,
            "learning_rate": a.lr, "lr_scheduler_type": "linear", "warmup_steps": 0, "max_grad_norm": 1.0,
            "seed": 0, "val_size": 0, "logging_steps": 1, "report_to": "none",
            "data_cache_dir": str(work / "cache"), "overwrite_output_dir": True}
    config = write_config(work / "r1tune-grpo.yaml", keys)
    row = measure([sys.executable, "-m", "r1tune", "train", str(config)], work / "r1tune.log")
    result = json.loads((out / "eval_results.json").read_text())
    logged = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    logged = [entry for entry in logged if entry.get("split", "train") == "train" and "reward" in entry]
    samples = out / "completions.jsonl"
    prompts = {json.loads(line)["prompt"] for line in samples.read_text().splitlines() if line.strip()} \
        if samples.exists() else set()
    row.update(seconds=result["train_runtime"], steps=result.get("global_step"),
               rewards=[e["reward"] for e in logged],
               lengths=[e.get("completions/mean_length") for e in logged], results=result, prompts=prompts)
    return row


def run_trl(work: Path, model: Path, data: Path, reward: Path, bf16: bool, a: argparse.Namespace) -> dict:
    args = {"model": str(model), "data": str(data), "out": str(work / "trl-out"), "reward_file": str(reward),
            "lr": a.lr, "bf16": bf16, "targets": lora_targets(model), "batch": a.batch,
            "generations": a.num_generations, "completion": a.max_completion_length, "steps": a.steps,
            "no_checkpointing": a.trl_no_checkpointing}
    row = measure([sys.executable, "-c", TRL_SCRIPT, json.dumps(args)], work / "trl.log",
                  env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    result = json.loads(row["text"].split("RESULT ", 1)[1].splitlines()[0])
    row.update(seconds=result["train_runtime"], steps=result["steps"], rewards=result["rewards"],
               lengths=result["lengths"], results=result)
    return row


def check_prompts(rows: dict, tokenizer, records: list[dict]) -> str:
    """Whether r1tune's rendered prompts (completions.jsonl) are TRL's, text and tokens."""
    rendered = rows["TRL"]["results"]["rendered"]
    theirs = set(rendered.values())
    mine = rows["r1tune"]["prompts"]
    if not mine:
        return "not checked: r1tune wrote no completions.jsonl"
    missing = mine - theirs
    ids_mine = tokenizer(rendered[records[0]["instruction"]], add_special_tokens=False).input_ids
    same_ids = ids_mine == rows["TRL"]["results"]["first_ids"]
    if missing:
        return (f"DIFFERENT: {len(missing)} of r1tune's {len(mine)} logged prompts are not TRL's, "
                f"e.g. {next(iter(missing))!r}")
    return (f"same text for all {len(mine)} prompts r1tune logged (e.g. {next(iter(mine))!r}); tokens "
            f"{'the same' if same_ids else 'DIFFERENT'} (r1tune tokenizes the text without special tokens, "
            "TRL the template)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("qwen2", "deepseek_v3"), default="qwen2")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 20; --quick 4)")
    parser.add_argument("--num-generations", type=int, default=None, help="completions per prompt (default 8; --quick 4)")
    parser.add_argument("--batch", type=int, default=None,
                        help="per_device_train_batch_size in completions, a multiple of --num-generations "
                             "(default 16; --quick 8)")
    parser.add_argument("--max-completion-length", type=int, default=None, help="tokens (default 64; --quick 16)")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--trl-no-checkpointing", action="store_true",
                        help="turn TRL's default gradient checkpointing off (r1tune's default here is off)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 steps of 8 completions, 16 tokens")
    args = parser.parse_args()
    args.steps = args.steps or (4 if args.quick else 20)
    args.num_generations = args.num_generations or (4 if args.quick else 8)
    args.batch = args.batch or (8 if args.quick else 16)
    args.max_completion_length = args.max_completion_length or (16 if args.quick else 64)
    if args.batch % args.num_generations:
        parser.error(f"--batch {args.batch} must be a multiple of --num-generations {args.num_generations}")
    per_step = args.batch // args.num_generations

    from transformers import AutoTokenizer

    from r1tune.envinfo import cpu_features
    from r1tune.models.tiny import build_tiny

    print(cpu_features())
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    work = Path(tempfile.mkdtemp(prefix="r1tune-grpo-bench-"))
    model = build_tiny(work / f"tiny-{args.arch}", args.arch, hidden_size=args.hidden_size, num_layers=args.layers)
    tokenizer = AutoTokenizer.from_pretrained(model)
    data, reward = work / "prompts.jsonl", work / "reward.py"
    records = write_prompts(data, args.steps * per_step)
    reward.write_text(REWARD_FILE, encoding="utf-8")
    params = _params(model)
    print(f"model: tiny {args.arch}, hidden {args.hidden_size}, {args.layers} layers, {params / 1e6:.1f}M parameters; "
          f"{args.steps} steps x {per_step} prompts x {args.num_generations} completions (batch {args.batch}), "
          f"max_completion_length {args.max_completion_length}, {len(records)} prompts (one epoch); LoRA "
          f"r16/alpha32 on {len(lora_targets(model)['modules'].split('|'))} modules; loss dapo, beta 0, "
          f"temperature 1.0, lr {args.lr:g}", flush=True)

    busy = other_cpu_users()
    if busy:
        print(f"WARNING: other processes are using the CPU, timings will be off: {busy}", flush=True)
    rows = {}
    try:
        rows["r1tune"] = run_r1tune(work, model, data, reward, args)
    except RuntimeError as exc:
        print(f"r1tune failed:\n{exc}")
        return 1
    bf16 = r1tune_bf16(rows["r1tune"])
    print(f"r1tune precision: bf16={bf16} ({_precision_lines(rows['r1tune']['text'])})", flush=True)
    try:
        rows["TRL"] = run_trl(work, model, data, reward, bf16, args)
        r = rows["TRL"]["results"]
        print(f"TRL precision: bf16={r['bf16']} (weights {r['dtype']}), gradient_checkpointing="
              f"{r['gradient_checkpointing']}; trainable parameters {r['trainable']:,} (r1tune "
              f"{_trainable(rows['r1tune']['text'])}); generation_batch_size {r['generation_batch_size']}", flush=True)
        print(f"prompts: {check_prompts(rows, tokenizer, records)}", flush=True)
    except RuntimeError as exc:
        print(f"TRL failed:\n{exc}")

    print_table(rows, args.steps)
    if "TRL" in rows:
        mine, theirs = rows["r1tune"], rows["TRL"]
        rate = lambda row: (row["steps"] or args.steps) / row["seconds"]  # noqa: E731
        print(f"\nr1tune / TRL: steps/s {rate(mine) / rate(theirs):.2f}x (goal >= 2x), "
              f"whole command {theirs['wall'] / mine['wall']:.2f}x faster, "
              f"peak RSS {mine['rss'] / theirs['rss']:.2f}x (goal <= 0.5x), "
              f"tree RSS {mine['tree'] / theirs['tree']:.2f}x")
    print(f"\nfiles in {work} (r1tune.log, trl.log, r1tune-grpo.yaml, prompts.jsonl, reward.py, "
          "r1tune-out/completions.jsonl)")
    return 0


def _trainable(text: str) -> str:
    """r1tune's count from its "trainable params: N || ..." line."""
    for line in text.splitlines():
        if line.startswith("trainable params:"):
            return line.split(":", 1)[1].split("||")[0].strip()
    return "?"


def print_table(rows: dict, steps: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="GRPO: r1tune vs TRL")
    for name in ("tool", "steps", "loop s", "steps/s", "command s", "peak RSS", "tree RSS", "mean reward",
                 "last reward", "mean length", "CPU s", "others"):
        table.add_column(name, justify="left" if name == "tool" else "right")
    for name, row in rows.items():
        rewards, lengths = row["rewards"], [v for v in row["lengths"] if v is not None]
        table.add_row(name, str(row["steps"] or 0), f"{row['seconds']:.1f}",
                      f"{(row['steps'] or steps) / row['seconds']:.3f}",
                      f"{row['wall']:.1f}", f"{row['rss']:.2f} G", f"{row['tree']:.2f} G",
                      f"{_num(sum(rewards) / len(rewards) if rewards else None):.4f}",
                      f"{_num(rewards[-1] if rewards else None):.4f}",
                      f"{_num(sum(lengths) / len(lengths) if lengths else None):.1f}",
                      f"{row['cpu']:.0f}", f"{row['others']:.0f}")
    console = Console()
    if not console.is_terminal:  # a log file: no need to squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)
    console.print("loop s: each tool's train_runtime (rollouts, rewards, updates); mean reward / length: over the "
                  "logged steps (one log per step); CPU s: the run's own CPU-seconds; others: CPU-seconds everything "
                  "else on the machine used meanwhile (more than a few means the timings are disturbed)",
                  highlight=False)


if __name__ == "__main__":
    sys.exit(main())
