"""Short real training runs on tiny models: loss falls, outputs are complete, resume is exact."""

import json
import shutil

import pytest
import torch

from r1tune.data.encode import Example
from r1tune.train import batching
from r1tune.train.logs import read_log
from r1tune.train.schedule import lr_factor
from r1tune.train.stages.sft import run_sft
from r1tune.train.engine import Engine
from r1tune.train.stage_loss import CausalLMLoss
from tests.conftest import make_cfg


def train_losses(out):
    return {r["step"]: r["loss"] for r in read_log(out) if r["split"] == "train"}


@pytest.mark.parametrize("model_fixture", ["tiny_ds", "tiny_qwen"])
def test_lora_loss_falls(request, model_fixture, parity_file, tmp_path):
    model = request.getfixturevalue(model_fixture)
    cfg = make_cfg(model, parity_file, tmp_path / "out", max_steps=16, lora_rank=8, learning_rate=1e-2)
    run_sft(cfg)
    losses = list(train_losses(tmp_path / "out").values())
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "r1tune_config.yaml",
            "trainer_log.jsonl"} <= files
    assert not any(name.startswith(".tmp") for name in files)


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_full_and_freeze_train(tiny_ds, parity_file, tmp_path, method):
    cfg = make_cfg(tiny_ds, parity_file, tmp_path / "out", finetuning_type=method, freeze_trainable_layers=1,
                   learning_rate=1e-3, max_steps=8)
    run_sft(cfg)
    losses = list(train_losses(tmp_path / "out").values())
    assert losses[-1] < losses[0]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_outputs_tensorboard_plot_eval_and_metric(tiny_ds, parity_file, tmp_path):
    out = tmp_path / "out"
    cfg = make_cfg(tiny_ds, parity_file, out, max_steps=6, val_size=8, eval_steps=3, report_to="tensorboard",
                   plot_loss=True, eval_generate_samples=4, max_new_tokens=8)
    result = run_sft(cfg)
    assert list(out.glob("runs/events.out.tfevents.*"))
    assert (out / "training_loss.png").stat().st_size > 1000
    evals = [r for r in read_log(out) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6] and evals[-1]["perplexity"] > 1
    assert result.eval_loss == pytest.approx(evals[-1]["loss"], abs=1e-5)


def test_early_stopping(tiny_ds, parity_file, tmp_path):
    # learning_rate so high that eval loss gets worse: training stops after `patience` evaluations
    cfg = make_cfg(tiny_ds, parity_file, tmp_path / "out", finetuning_type="full", learning_rate=0.5,
                   max_steps=40, val_size=8, eval_steps=1, early_stopping_patience=2, max_grad_norm=0)
    result = run_sft(cfg)
    assert result.stopped_early and result.global_step < 40


def test_resume_continues_with_same_losses(tiny_ds, parity_file, tmp_path):
    full = tmp_path / "full"
    cfg = make_cfg(tiny_ds, parity_file, full, max_steps=6, save_steps=3, lora_dropout=0.1, lora_experts=False)
    run_sft(cfg)
    reference = train_losses(full)
    # Simulate a crash right after the step-3 checkpoint: only the checkpoint and the log survive.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-3", crashed / "checkpoint-3")
    shutil.copy(full / "trainer_log.jsonl", crashed / "trainer_log.jsonl")
    resumed_cfg = make_cfg(tiny_ds, parity_file, crashed, max_steps=6, save_steps=3, lora_dropout=0.1,
                           lora_experts=False, resume_from_checkpoint="auto")
    result = run_sft(resumed_cfg)
    resumed = train_losses(crashed)
    assert result.global_step == 6 and sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6)


def test_checkpoint_is_atomic_and_limited(tiny_ds, parity_file, tmp_path):
    out = tmp_path / "out"
    run_sft(make_cfg(tiny_ds, parity_file, out, max_steps=7, save_steps=2, save_total_limit=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_accumulation_normalises_over_all_tokens(tiny_ds, parity_file, tmp_path):
    """bs=4 × accumulation 2 gives the same gradient as one batch of 8 (uneven token counts)."""
    from r1tune.data.prepare import prepare_data
    from r1tune.models.loading import load_model, load_tokenizer
    from r1tune.models.methods import attach_method

    grads = []
    # whole batch of 8; 4 x accumulation 2; 8 cut into token-budget micro-batches
    for bs, ga, budget in ((8, 1, 0), (4, 2, 0), (8, 1, 48)):
        cfg = make_cfg(tiny_ds, parity_file, tmp_path / f"o{bs}{budget}", per_device_train_batch_size=bs,
                       gradient_accumulation_steps=ga, finetuning_type="full", max_grad_norm=0,
                       micro_batch_tokens=budget)
        tok = load_tokenizer(str(tiny_ds))
        data = prepare_data(cfg, tok)
        model = attach_method(load_model(str(tiny_ds)), cfg)
        stage = CausalLMLoss(model, tok.pad_token_id, cfg.chunked_loss)
        trainer = Engine(model, cfg, stage, data.train, [], tmp_path)
        trainer.optimizer.step = lambda: None  # keep weights; inspect the gradient only
        trainer.optimizer.zero_grad = lambda set_to_none=True: None
        if budget:
            step = trainer.plan.micro_batches(0)[0]
            assert len(batching.split_by_tokens(step, budget)) > 2  # the budget really cuts this batch
        loss, _, _, _ = trainer.train_step(0)
        grads.append((loss, model.lm_head.weight.grad.clone()))
    for loss, grad in grads[1:]:
        assert grads[0][0] == pytest.approx(loss, rel=1e-5)
        assert torch.allclose(grads[0][1], grad, atol=1e-6)


def test_split_by_tokens_keeps_every_example_within_budget():
    import random

    rng = random.Random(0)
    batch = [Example([1] * n, [1] * n) for n in (rng.randint(1, 300) for _ in range(32))]
    parts = batching.split_by_tokens(batch, 512)
    assert sorted(id(e) for p in parts for e in p) == sorted(id(e) for e in batch)
    for part in parts:
        widths = [len(e.input_ids) for e in part]
        assert len(part) == 1 or len(part) * batching.padded_width(max(widths)) <= 512  # as collate pads it
    padded = sum(len(p) * max(len(e.input_ids) for e in p) for p in parts)
    assert padded < 32 * 300  # longest-first cutting also pads less than one 32-row batch
    assert batching.split_by_tokens(batch, 0) == [batch]
    assert [len(p) for p in batching.split_by_tokens(batch, 1)] == [1] * 32  # never below one row
    assert batching.micro_batch_budget(None, "cpu") == 512 and batching.micro_batch_budget(None, "cuda") == 0
    assert batching.micro_batch_budget(4096, "cuda") == 4096
    # smaller models get more tokens, in proportion to their matmul work per token (20M Qwen2: 512)
    from types import SimpleNamespace
    qwen_20m = SimpleNamespace(hidden_size=512, intermediate_size=1408, num_hidden_layers=6)
    assert batching.micro_batch_budget(None, "cpu", qwen_20m) == 512
    assert batching.micro_batch_budget(None, "cpu", SimpleNamespace(hidden_size=256, intermediate_size=704,
                                                                     num_hidden_layers=4)) == 3072
    assert batching.micro_batch_budget(None, "cpu", SimpleNamespace(hidden_size=64, intermediate_size=192,
                                                                     num_hidden_layers=2)) == 4096
    assert batching.micro_batch_budget(None, "cpu", SimpleNamespace(hidden_size=4096, intermediate_size=11008,
                                                                     num_hidden_layers=32)) == 512
    ds_20m = SimpleNamespace(hidden_size=448, intermediate_size=896, num_hidden_layers=6)  # bench's 20M MoE
    assert batching.micro_batch_budget(None, "cpu", ds_20m) == 512
    assert batching.micro_batch_budget(None, "cuda", qwen_20m) == 0


def test_auto_grouping_counts_padding_after_micro_batch_cutting():
    # one long row with seven short ones: 77 % padding as one batch, none once cut at 512 tokens
    examples = [Example([1] * n, [1] * n) for n in [500] + [60] * 7] * 4
    uncut = batching.BatchPlan(examples, 8, 1, seed=0, group_by_length=None)
    cut = batching.BatchPlan(examples, 8, 1, seed=0, group_by_length=None, micro_tokens=512)
    lengths, batches = [500] + [60] * 7, [list(range(8))]
    assert batching.padding_share(lengths, batches) > 0.7
    assert batching.padding_share(lengths, batches, 512) == 0.0
    assert uncut.group_by_length is True and cut.group_by_length is False


def test_length_grouping_cuts_padding_and_covers_epoch():
    import random

    rng = random.Random(0)
    examples = [Example([1] * n, [1] * n) for n in (rng.choice([10, 20, 300]) for _ in range(400))]

    def padding(group):
        pad = real = 0
        for step in range(batching.steps_per_epoch(400, 8, 1)):
            for batch in batching.step_micro_batches(examples, 8, 1, seed=3, step=step, group_by_length=group):
                width = max(len(e.input_ids) for e in batch)
                pad += sum(width - len(e.input_ids) for e in batch)
                real += sum(len(e.input_ids) for e in batch)
        return pad / (pad + real)

    assert padding(True) < 0.05 < 0.5 < padding(False)
    seen = [id(e) for s in range(50) for b in batching.step_micro_batches(examples, 8, 1, 3, s, True) for e in b]
    assert sorted(seen) == sorted(id(e) for e in examples)


def test_batches_are_deterministic_and_cover_epoch():
    examples = [Example([i, i], [i, i]) for i in range(10)]
    steps = [batching.step_micro_batches(examples, 3, 2, seed=1, step=s) for s in range(2)]
    seen = [e.input_ids[0] for step in steps for batch in step for e in batch]
    assert sorted(seen) == list(range(10))
    assert steps[0] == batching.step_micro_batches(examples, 3, 2, seed=1, step=0)


def test_schedules():
    assert lr_factor(0, 100, 10, "linear") < lr_factor(9, 100, 10, "linear") <= 1.0
    assert lr_factor(99, 100, 10, "linear") < 0.02
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5, abs=0.01)
    assert lr_factor(90, 100, 10, "constant_with_warmup") == 1.0


def test_resume_discards_newer_checkpoints(tiny_ds, parity_file, tmp_path):
    out = tmp_path / "out"
    run_sft(make_cfg(tiny_ds, parity_file, out, max_steps=7, save_steps=2))
    shutil.rmtree(out / "checkpoint-4")  # keep 2 and 6; resume from 2 must drop 6
    run_sft(make_cfg(tiny_ds, parity_file, out, max_steps=7, save_steps=2, save_total_limit=1,
                     resume_from_checkpoint=str(out / "checkpoint-2")))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_mismatched_checkpoint_is_a_user_error_and_writes_nothing(tiny_ds, parity_file, tmp_path):
    from r1tune.errors import UserError

    run_sft(make_cfg(tiny_ds, parity_file, tmp_path / "a", max_steps=2, save_steps=1, lora_rank=4))
    other = tmp_path / "b"
    with pytest.raises(UserError, match="another shape \\(lora_rank changed\\?\\)"):
        run_sft(make_cfg(tiny_ds, parity_file, other, max_steps=4, lora_rank=8,
                         resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1")))
    assert not other.exists()


def test_overwrite_replaces_previous_method_outputs(tiny_ds, parity_file, tmp_path):
    out = tmp_path / "out"
    run_sft(make_cfg(tiny_ds, parity_file, out, max_steps=1))
    run_sft(make_cfg(tiny_ds, parity_file, out, max_steps=1, finetuning_type="full", overwrite_output_dir=True))
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()


def test_finished_dir_is_protected_even_with_auto_resume(tiny_ds, parity_file, tmp_path):
    from r1tune.errors import UserError

    out = tmp_path / "out"
    run_sft(make_cfg(tiny_ds, parity_file, out, max_steps=1))
    with pytest.raises(UserError, match="already holds a trained model"):
        run_sft(make_cfg(tiny_ds, parity_file, out, max_steps=1, resume_from_checkpoint="auto"))


def test_gradient_checkpointing_and_bf16(tiny_ds, parity_file, tmp_path):
    """Checkpointing recomputes the same numbers; bf16 autocast trains too."""
    runs = {}
    for name, extra in {"plain": {}, "ckpt": {"gradient_checkpointing": True}, "bf16": {"bf16": True}}.items():
        run_sft(make_cfg(tiny_ds, parity_file, tmp_path / name, max_steps=4, **extra))
        runs[name] = train_losses(tmp_path / name)
    for step in runs["plain"]:
        assert runs["ckpt"][step] == pytest.approx(runs["plain"][step], abs=1e-5)
        assert runs["bf16"][step] == pytest.approx(runs["plain"][step], rel=0.05)
    assert runs["bf16"][4] < runs["bf16"][1]


def test_skipped_records_report_file(tiny_ds, parity_file, tmp_path):
    with parity_file.open("a") as f:
        f.write('{"messages": [{"role": "user", "content": "only a question"}]}\n')
    out = tmp_path / "out"
    run_sft(make_cfg(tiny_ds, parity_file, out, max_steps=1, on_bad_record="skip"))
    rows = [json.loads(x) for x in (out / "skipped_records.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["where"].endswith("line 65") and "ends with a user message" in rows[0]["reason"]
    assert rows[0]["record"]["messages"][0]["content"] == "only a question"


def test_group_by_length_run(tiny_ds, parity_file, tmp_path):
    run_sft(make_cfg(tiny_ds, parity_file, tmp_path / "out", max_steps=6, group_by_length=True, learning_rate=1e-2))
    losses = train_losses(tmp_path / "out")
    assert losses[6] < losses[1]
