"""Several processes on this machine (gloo, 2 CPU processes): the same steps as one process with the same global
batch, checkpoints that resume under another number of processes, every example once per epoch across ranks,
preference and GRPO runs, a failing rank ending the job with its own line, and the launch environment."""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from r1tune.errors import UserError
from r1tune.launch import plan_from_env
from r1tune.train import batching, distributed, zero
from tests.conftest import ROOT, make_cfg, write_jsonl

TIMEOUT = 240  # a hang fails the test instead of the suite
EXAMPLES = ROOT / "examples" / "distributed"
LLAMAFACTORY_DS = ["ds_z0_config.json", "ds_z2_config.json", "ds_z2_offload_config.json", "ds_z3_config.json",
                   "ds_z3_offload_config.json"]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="pip install deepspeed (the dev extra has it)")


def write_run(path, model, data, out, **keys):
    raw = dict(model_name_or_path=str(model), dataset=str(data), output_dir=str(out), per_device_train_batch_size=4,
               learning_rate=3e-3, max_steps=4, logging_steps=1, save_steps=1000, cutoff_len=96, report_to="none",
               plot_loss=False, seed=7, bf16=False, val_size=0, update_heatmap=False)
    raw.update(keys)
    path.write_text(json.dumps(raw), encoding="utf-8")  # JSON is YAML
    return path


def train(run_file, processes: int, launcher: str = "r1tune", *overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_TORCHRUN", "NPROC_PER_NODE", "WORLD_SIZE")}
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--standalone", "-m", "r1tune", "train", str(run_file), *overrides]
    else:
        command = [sys.executable, "-m", "r1tune", "train", str(run_file), *overrides]
        if processes > 1:
            env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE=str(processes))
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher and every worker it started
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(out):
    lines = (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def losses(out):
    return [r["loss"] for r in records(out)]


def adapter(out):
    return load_file(str(out / "adapter_model.safetensors"))


def assert_same_weights(a, b, atol=5e-5):
    """Adam divides by the gradients' own scale, so summation-order noise in near-zero gradients reaches the weights
    at about 1e-5 (1.08e-5 with ATen capped to AVX2); a missing gradient sum moves them by about lr (1e-3)."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.fixture
def parity(parity_file):
    return parity_file


def saved_weights(out):
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(out / name))


FULL = dict(finetuning_type="full", learning_rate=1e-4)


@pytest.mark.parametrize("launcher, keys", [
    ("r1tune", {}),  # DDP-style data parallelism, LoRA
    ("torchrun", {}),
    ("r1tune", {"fsdp": "full_shard auto_wrap"}),
    ("r1tune", {"fsdp": "shard_grad_op auto_wrap", **FULL}),
], ids=["ddp-lora", "ddp-torchrun", "fsdp-full_shard-lora", "fsdp-shard_grad_op-full"])
def test_two_processes_take_the_same_steps_as_one(launcher, keys, tiny_qwen, parity, tmp_path):
    """Same global batch (16 = 8 x 2 accumulation x 1 process = 4 x 2 x 2 processes), length-grouped and cut by a
    small token budget (so the ranks' micro-batch counts differ): per-step losses, gradient norms and the saved
    weights agree (fp32)."""
    keys = dict(gradient_accumulation_steps=2, group_by_length=True, micro_batch_tokens=160, **keys)
    one_keys = {k: v for k, v in keys.items() if k != "fsdp"}
    one = ok(train(write_run(tmp_path / "one.yaml", tiny_qwen, parity, tmp_path / "one", per_device_train_batch_size=8,
                             **one_keys), 1))
    two = ok(train(write_run(tmp_path / "two.yaml", tiny_qwen, parity, tmp_path / "two", **keys), 2, launcher))
    assert "4 examples per process x 2 accumulation x 2 processes = 16 examples" in two.stdout
    assert "8 examples per process x 2 accumulation x 1 process = 16 examples" in one.stdout
    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    assert len(a) == len(b) == 4 and a[0]["loss"] != a[-1]["loss"]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    assert_same_weights(saved_weights(tmp_path / "one"), saved_weights(tmp_path / "two"))
    assert {p.name for p in (tmp_path / "two").glob("*.safetensors")} == {p.name for p in (tmp_path / "one").glob("*.safetensors")}


@pytest.mark.parametrize("first, then, keys", [(2, 1, {}), (1, 2, {}), (2, 1, {"fsdp": "full_shard auto_wrap"}),
                                              (1, 2, {"fsdp": "full_shard auto_wrap"})],
                         ids=["ddp-2to1", "ddp-1to2", "fsdp-2to1", "fsdp-1to2"])
def test_checkpoint_resumes_under_another_number_of_processes(first, then, keys, tiny_qwen, parity, tmp_path):
    per_device = {1: 8, 2: 4}
    run = write_run(tmp_path / "a.yaml", tiny_qwen, parity, tmp_path / "a", per_device_train_batch_size=per_device[first],
                    save_steps=2, **keys)
    ok(train(run, first))
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert checkpoint.is_dir()
    resumed = write_run(tmp_path / "b.yaml", tiny_qwen, parity, tmp_path / "b", save_steps=2,
                        per_device_train_batch_size=per_device[then], resume_from_checkpoint=str(checkpoint), **keys)
    result = ok(train(resumed, then))
    assert "resumed from" in result.stdout
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a")[2:], abs=1e-5)
    assert_same_weights(adapter(tmp_path / "a"), adapter(tmp_path / "b"))


def test_two_nodes_on_one_machine_train_as_one_job(tiny_qwen, parity, tmp_path):
    """NNODES=2 with one process per node, both "nodes" on this machine (NODE_RANK 0 and 1, the same MASTER_ADDR
    and MASTER_PORT): the multi-node launch path, with the same steps as one process."""
    from r1tune.launch import free_port

    one = write_run(tmp_path / "one.yaml", tiny_qwen, parity, tmp_path / "one", per_device_train_batch_size=8)
    ok(train(one, 1))
    run = write_run(tmp_path / "run.yaml", tiny_qwen, parity, tmp_path / "two")
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_TORCHRUN", "NPROC_PER_NODE", "WORLD_SIZE")}
    env.update(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    command = [sys.executable, "-m", "r1tune", "train", str(run)]
    nodes = [subprocess.Popen(command, env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for rank in (0, 1)]
    try:
        results = [node.communicate(timeout=TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert [node.returncode for node in nodes] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert "1 per node x 2 nodes; node rank 1" in results[1][1]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("grouped", [False, True])
def test_every_example_once_per_epoch_across_ranks(world, grouped):
    lengths = [5 + (i * 37) % 90 for i in range(53)]
    examples = list(range(len(lengths)))
    plan = batching.BatchPlan(examples, 4 * world, 2, seed=3, group_by_length=grouped, lengths=lengths)
    seen = []
    for step in range(plan.per_epoch):
        batches = plan.micro_batches(step)
        shares = [[distributed.share(batch, r, world) for batch in batches] for r in range(world)]
        for r in range(world):  # disjoint per step, and each rank's share of a batch is at most its per-device size
            assert all(len(part) <= 4 for part in shares[r])
        step_items = [i for r in range(world) for part in shares[r] for i in part]
        assert sorted(step_items) == sorted(i for batch in batches for i in batch)
        seen += step_items
    assert sorted(seen) == examples


def test_dpo_runs_under_two_processes(tiny_qwen, tmp_path):
    pairs = [{"instruction": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.", "rejected": "No idea."}
             for a in range(1, 7) for b in range(1, 5)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "dpo"
    ok(train(write_run(tmp_path / "dpo.yaml", tiny_qwen, data, out, stage="dpo", max_steps=3, val_size=4), 2))
    assert len(losses(out)) == 3 and (out / "adapter_model.safetensors").is_file()
    results = json.loads((out / "eval_results.json").read_text(encoding="utf-8"))
    assert results["after"]["rewards/margins"] > results["before"]["rewards/margins"]


GRPO_PROMPTS = [{"instruction": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(1, 6) for b in range(1, 4)]

RANK_REWARD = '''
import os


def per_rank(completions, **kwargs):
    """Scores on rank 0; on rank 1 returns one value too few (r1tune's check names this function)."""
    scores = [float(len(c) % 3) for c in completions]
    return scores[:-1] if os.environ.get("RANK") == "1" else scores
'''


def test_grpo_runs_under_two_processes(tiny_qwen, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", GRPO_PROMPTS)  # 15 prompts, 2 per step: the epoch's last step has 1
    out = tmp_path / "grpo"
    run = write_run(tmp_path / "grpo.yaml", tiny_qwen, data, out, stage="grpo", reward_funcs=["think_format", "accuracy"],
                    num_generations=4, per_device_train_batch_size=4, max_completion_length=12, max_steps=8,
                    val_size=0)
    ok(train(run, 2))
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 9))
    assert all("reward" in r and "completions/clipped_ratio" in r for r in train_records)
    assert (out / "adapter_model.safetensors").is_file() and (out / "completions.jsonl").is_file()


def test_a_failing_rank_ends_the_job_with_its_own_line(tiny_qwen, tmp_path):
    (tmp_path / "rank_reward.py").write_text(RANK_REWARD, encoding="utf-8")
    data = write_jsonl(tmp_path / "p.jsonl", GRPO_PROMPTS)
    run = write_run(tmp_path / "grpo.yaml", tiny_qwen, data, tmp_path / "out", stage="grpo",
                    reward_funcs=[f"{tmp_path / 'rank_reward.py'}:per_rank"], num_generations=4,
                    per_device_train_batch_size=4, max_completion_length=8, max_steps=4)
    result = train(run, 2)  # TIMEOUT: a hang fails here
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("r1tune: stopped, rank 1 failed: error:") and "per_rank" in last, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("env, gpus, expected", [
    ({}, 0, None),
    ({}, 1, None),
    ({}, 4, (4, 1, 0)),
    ({"FORCE_TORCHRUN": "1"}, 0, (1, 1, 0)),
    ({"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, 0, (2, 1, 0)),
    ({"NPROC_PER_NODE": "2"}, 0, (2, 1, 0)),
    ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501"}, 8, (8, 2, 1)),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, 4, None),  # already a torchrun worker
    ({"FORCE_TORCHRUN": "1", "LOCAL_RANK": "0"}, 0, None),  # accelerate launch / torchrun with one process
])
def test_launch_plan_follows_llamafactory_variables(env, gpus, expected):
    plan = plan_from_env(env, gpus)
    if expected is None:
        assert plan is None
        return
    assert (plan.nproc_per_node, plan.nnodes, plan.node_rank) == expected
    if "MASTER_ADDR" in env:
        assert (plan.master_addr, plan.master_port) == ("10.0.0.1", 29501)
    else:
        assert plan.master_addr == "127.0.0.1" and plan.master_port > 0


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "2"}, "MASTER_ADDR"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2 must be below NNODES=2"),
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE='two' must be a whole number"),
])
def test_launch_variables_are_checked(env, message):
    with pytest.raises(UserError, match=message):
        plan_from_env(env, 0)



# --- DeepSpeed ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LLAMAFACTORY_DS)
def test_llamafactory_deepspeed_configs_get_their_auto_values(name, tiny_qwen, parity):
    cfg = make_cfg(tiny_qwen, parity, "out", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                   max_grad_norm=0.5, deepspeed=str(EXAMPLES / name))
    filled = zero.fill_auto(zero.read_config(cfg.deepspeed, cfg.source), cfg, world=2, per_device=4, hidden_size=64,
                            bf16=True)
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"],
            filled["train_batch_size"], filled["gradient_clipping"]) == (4, 2, 16, 0.5)
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    zero_section = filled["zero_optimization"]
    if zero_section["stage"] == 3:
        assert (zero_section["reduce_bucket_size"], zero_section["stage3_prefetch_bucket_size"],
                zero_section["stage3_param_persistence_threshold"]) == (4096, 3686, 640)
    assert "auto" not in json.dumps(filled)
    offload = "offload_optimizer" in zero_section
    assert filled.get("zero_force_ds_cpu_optimizer", True) is (not offload)


@pytest.mark.parametrize("change, message", [
    ({"train_micro_batch_size_per_gpu": 2}, "'train_micro_batch_size_per_gpu' is 2 but the run file gives 4"),
    ({"optimizer": {"type": "AdamW"}}, "has a 'optimizer' section"),
    ({"scheduler": {"type": "WarmupLR"}}, "has a 'scheduler' section"),
    ({"wall_clock_breakdown": "auto"}, "'wall_clock_breakdown' is \"auto\""),
])
def test_deepspeed_config_contradictions_are_named(change, message, tiny_qwen, parity):
    raw = {**json.loads((EXAMPLES / "ds_z2_config.json").read_text()), **change}
    cfg = make_cfg(tiny_qwen, parity, "out", per_device_train_batch_size=4, deepspeed=raw)
    with pytest.raises(UserError, match=message):
        zero.fill_auto(zero.read_config(cfg.deepspeed, cfg.source), cfg, world=1, per_device=4, hidden_size=64,
                       bf16=False)


@needs_deepspeed
@pytest.mark.parametrize("name", ["ds_z2_config.json", "ds_z3_offload_config.json"])
def test_deepspeed_zero_takes_the_same_steps_as_one_process(name, tiny_qwen, parity, tmp_path):
    one = ok(train(write_run(tmp_path / "one.yaml", tiny_qwen, parity, tmp_path / "one", per_device_train_batch_size=8),
                   1))
    two = ok(train(write_run(tmp_path / "two.yaml", tiny_qwen, parity, tmp_path / "two",
                             deepspeed=str(EXAMPLES / name)), 2))
    assert "peak memory per process" in two.stdout and "1 process = 8 examples" in one.stdout
    for x, y in zip(records(tmp_path / "one"), records(tmp_path / "two")):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    assert_same_weights(adapter(tmp_path / "one"), adapter(tmp_path / "two"))


@needs_deepspeed
def test_deepspeed_zero3_checkpoint_resumes_under_any_number_of_processes(tiny_qwen, parity, tmp_path):
    """Same count: DeepSpeed's own files, bit-identical; another count: converted once by ds_to_universal."""
    keys = dict(deepspeed=str(EXAMPLES / "ds_z3_config.json"), save_steps=2)
    ok(train(write_run(tmp_path / "a.yaml", tiny_qwen, parity, tmp_path / "a", **keys), 2))
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "deepspeed").is_dir()
    ok(train(write_run(tmp_path / "b.yaml", tiny_qwen, parity, tmp_path / "b", resume_from_checkpoint=str(checkpoint),
                       **keys), 2))
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a")[2:], abs=1e-6)
    assert_same_weights(adapter(tmp_path / "a"), adapter(tmp_path / "b"), atol=0)
    ok(train(write_run(tmp_path / "c.yaml", tiny_qwen, parity, tmp_path / "c", resume_from_checkpoint=str(checkpoint),
                       per_device_train_batch_size=8, **keys), 1))
    assert (checkpoint / "deepspeed_universal").is_dir()
    assert losses(tmp_path / "c") == pytest.approx(losses(tmp_path / "a")[2:], abs=1e-5)
    assert_same_weights(adapter(tmp_path / "a"), adapter(tmp_path / "c"))


@needs_deepspeed
def test_deepspeed_zero2_checkpoint_needs_as_many_processes(tiny_qwen, parity, tmp_path):
    keys = dict(deepspeed=str(EXAMPLES / "ds_z2_config.json"), save_steps=2)
    ok(train(write_run(tmp_path / "a.yaml", tiny_qwen, parity, tmp_path / "a", **keys), 2))
    other = train(write_run(tmp_path / "c.yaml", tiny_qwen, parity, tmp_path / "c", per_device_train_batch_size=8,
                            resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"), **keys), 1)
    assert other.returncode == 2, other.stderr[-2000:]
    assert "written by DeepSpeed ZeRO-2 with 2 processes" in other.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("name", ["sft_lora_ds_z3.yaml", "sft_full_fsdp.yaml"])
def test_distributed_examples_run_under_two_processes(name, tiny_qwen, tmp_path, monkeypatch):
    if "ds_" in name and not HAS_DEEPSPEED:
        pytest.skip("pip install deepspeed")
    monkeypatch.chdir(ROOT)  # the examples name their files from the repository root
    out = tmp_path / "out"
    ok(train(EXAMPLES / name, 2, "r1tune", f"model_name_or_path={tiny_qwen}", f"output_dir={out}", "max_steps=2",
             "save_steps=1000"))
    assert [r["step"] for r in records(out)] == [2]  # logging_steps 5: the last step is logged
    assert json.loads((out / "eval_results.json").read_text())["global_step"] == 2
