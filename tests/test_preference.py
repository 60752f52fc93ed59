"""Preference and reward stages end to end on tiny models: dpo (every pref_loss), kto and rm train and
log TRL's metric names; the adapter-off reference is the base model; resume is exact; bad records
stop with one sentence; LLaMA-Factory's own dpo / kto / reward YAMLs run unchanged."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from r1tune.cli import main
from r1tune.train.logs import read_log
from r1tune.train.stages.registry import run_stage
from tests.conftest import make_cfg, write_jsonl

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"
REWARD_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def arithmetic_pairs(rejected=lambda a, b: "No idea."):
    """24 learnable pairs: a correct polite answer over a fixed curt one."""
    return [{"instruction": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.", "rejected": rejected(a, b)}
            for a in range(1, 7) for b in range(1, 5)]


def kto_records():
    """24 KTO records: odd sums answered (desirable), even sums brushed off (undesirable)."""
    def record(a, b):
        good = (a + b) % 2 == 1
        answer = f"The answer is {a + b}." if good else "No idea."
        return {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                             {"role": "assistant", "content": answer}], "kto_tag": good}
    return [record(a, b) for a in range(1, 7) for b in range(1, 5)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def train_records(out):
    return {r["step"]: r for r in read_log(out) if r["split"] == "train"}


def eval_results(out):
    return json.loads((Path(out) / "eval_results.json").read_text(encoding="utf-8"))


# --- 1. dpo with every pref_loss ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo", "orpo", "simpo"])
def test_dpo_each_pref_loss_trains_and_logs_trl_metrics(kind, tiny_qwen, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", arithmetic_pairs())
    out = tmp_path / "out"
    result = run_stage(make_cfg(tiny_qwen, data, out, stage="dpo", pref_loss=kind, learning_rate=5e-3, max_steps=8,
                                val_size=8, bf16=False))
    assert result.global_step == 8
    records = train_records(out)
    assert sorted(records) == list(range(1, 9))
    for record in records.values():
        assert set(REWARD_NAMES) <= set(record), sorted(record)
        assert 0.0 <= record["rewards/accuracies"] <= 1.0
        assert record["rewards/margins"] == pytest.approx(record["rewards/chosen"] - record["rewards/rejected"],
                                                          abs=1e-5)
    results = eval_results(out)
    before, after = results["before"], results["after"]
    assert set(REWARD_NAMES) <= set(before) and set(REWARD_NAMES) <= set(after)
    assert after["loss"] < 0.9 * before["loss"], (before["loss"], after["loss"])
    assert after["rewards/margins"] > before["rewards/margins"]
    assert after["rewards/accuracies"] > 0.5
    if kind not in ("orpo", "simpo"):  # policy == reference before training: every reward is 0
        assert before["rewards/chosen"] == before["rewards/rejected"] == 0.0
    assert (out / "adapter_model.safetensors").is_file()


# --- 2. the disabled-adapter reference is the base model ------------------------------------------

def test_adapter_off_reference_equals_a_separate_base_model(tiny_qwen, tmp_path):
    from r1tune.data.prepare import prepare_data
    from r1tune.models.attention import mask_format
    from r1tune.models.loading import load_model, load_tokenizer
    from r1tune.models.methods import attach_method
    from r1tune.train import batching
    from r1tune.train.reference import AdapterOff
    from r1tune.train.sequence_scores import SequenceScorer

    data = write_jsonl(tmp_path / "pairs.jsonl", arithmetic_pairs())
    cfg = make_cfg(tiny_qwen, data, tmp_path / "out", stage="dpo", lora_rank=4)
    tokenizer = load_tokenizer(str(tiny_qwen))
    items = prepare_data(cfg, tokenizer, say=lambda *a: None).train[:6]
    policy = attach_method(load_model(str(tiny_qwen)), cfg)
    generator = torch.Generator().manual_seed(0)
    lora_b = [p for name, p in policy.named_parameters() if "lora_B" in name]
    assert lora_b
    with torch.no_grad():
        for p in lora_b:  # a fresh adapter's B is zero: make the adapter change the outputs
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    policy.eval()
    rows = [i.rows[0] for i in items] + [i.rows[1] for i in items]
    batch = batching.collate(rows, tokenizer.pad_token_id, mask_format(policy.config._attn_implementation))

    scorer = SequenceScorer(policy)
    reference = AdapterOff().logps(policy, scorer, batch)
    with torch.no_grad():
        adapter_on = scorer.logps(batch)[0]
    base = load_model(str(tiny_qwen)).eval()
    with torch.no_grad():
        separate = SequenceScorer(base).logps(batch)[0]

    assert reference.shape == separate.shape == (12,)
    assert torch.allclose(reference, separate, atol=1e-5, rtol=0), (reference - separate).abs().max()
    assert (adapter_on - separate).abs().max() > 1e-2  # the adapter really is on outside AdapterOff
    # switching the adapter off left it on afterwards
    with torch.no_grad():
        assert torch.allclose(scorer.logps(batch)[0], adapter_on, atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_score_as_unpacked(attn, tiny_qwen, tmp_path):
    """Pair rows placed side by side (batching.collate_packed) keep each row's summed log-prob."""
    from r1tune.data.prepare import prepare_data
    from r1tune.models.attention import mask_format
    from r1tune.models.loading import load_model, load_tokenizer
    from r1tune.train import batching
    from r1tune.train.sequence_scores import SequenceScorer

    longer = arithmetic_pairs(rejected=lambda a, b: "I cannot say what that is, sorry, " * 3)
    data = write_jsonl(tmp_path / "pairs.jsonl", longer)
    cfg = make_cfg(tiny_qwen, data, tmp_path / "out", stage="dpo")
    tokenizer = load_tokenizer(str(tiny_qwen))
    items = prepare_data(cfg, tokenizer, say=lambda *a: None).train[:6]
    model = load_model(str(tiny_qwen), attn_implementation=attn).eval()
    rows = [i.rows[0] for i in items] + [i.rows[1] for i in items]
    fmt = mask_format(model.config._attn_implementation)
    plain = batching.collate(rows, tokenizer.pad_token_id, fmt)
    packed = batching.collate_packed(rows, tokenizer.pad_token_id, fmt)
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]  # the short rows really share
    assert packed["row_ids"].max() == len(rows) - 1
    scorer = SequenceScorer(model)
    with torch.no_grad():
        (a, a_n), (b, b_n) = scorer.logps(plain), scorer.logps(packed)
    assert torch.equal(a_n, b_n)
    assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()


def test_full_finetuning_frozen_copy_equals_precomputed_reference(tiny_qwen, tmp_path):
    """The two references of full fine-tuning (a frozen copy scoring each batch, or log-probabilities
    computed once before training) are the same starting policy: identical runs."""
    data = write_jsonl(tmp_path / "pairs.jsonl", arithmetic_pairs())
    logs = {}
    for precompute in (True, False):
        out = tmp_path / f"precompute-{precompute}"
        run_stage(make_cfg(tiny_qwen, data, out, stage="dpo", finetuning_type="full", learning_rate=1e-3,
                           precompute_ref_log_probs=precompute, max_steps=4, bf16=False))
        logs[precompute] = train_records(out)
    assert logs[True][1]["rewards/margins"] == 0.0  # policy == reference at the first step
    assert logs[True][4]["rewards/margins"] > 0.5
    for step in range(1, 5):
        for name in ("loss", *REWARD_NAMES):
            assert logs[False][step][name] == pytest.approx(logs[True][step][name], abs=1e-5), (step, name)


# --- 3. resume ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "full"])
def test_resumed_dpo_equals_uninterrupted(method, tiny_qwen, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", arithmetic_pairs())
    keys = dict(stage="dpo", max_steps=6, save_steps=3, bf16=False, finetuning_type=method)
    keys.update(lora_dropout=0.1, learning_rate=5e-3) if method == "lora" else keys.update(learning_rate=1e-3)
    full = tmp_path / "full"
    run_stage(make_cfg(tiny_qwen, data, full, **keys))
    reference = train_records(full)
    # a crash right after the step-3 checkpoint: only the checkpoint and the log survive
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-3", crashed / "checkpoint-3")
    shutil.copy(full / "trainer_log.jsonl", crashed / "trainer_log.jsonl")
    result = run_stage(make_cfg(tiny_qwen, data, crashed, resume_from_checkpoint="auto", **keys))
    resumed = train_records(crashed)
    assert result.global_step == 6 and sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        for name in ("loss", *REWARD_NAMES):
            assert resumed[step][name] == pytest.approx(reference[step][name], abs=1e-6), (step, name)
    # the run really moved between the checkpoint and the end (the comparison is not of constants)
    assert reference[6]["rewards/margins"] != reference[4]["rewards/margins"]


# --- 4. a pair without 'rejected' -------------------------------------------------------------------

def test_pair_without_rejected_exits_2_with_one_line(tiny_qwen, tmp_path):
    good = arithmetic_pairs()[0]
    data = write_jsonl(tmp_path / "pairs.jsonl", [good, {"instruction": "What is 2 plus 2?", "chosen": "4."}, good])
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in dict(
        model_name_or_path=str(tiny_qwen), stage="dpo", dataset=str(data), output_dir=str(out), max_steps=1,
        report_to="none", plot_loss=False).items()), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "r1tune", "train", str(config)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "pairs.jsonl line 2" in lines[0] and "'rejected'" in lines[0], lines[0]
    assert not out.exists()


# --- 5. kto -------------------------------------------------------------------------------------------

def test_kto_trains_and_logs_rewards_and_kl(tiny_qwen, tmp_path):
    data = write_jsonl(tmp_path / "kto.jsonl", kto_records())
    out = tmp_path / "out"
    run_stage(make_cfg(tiny_qwen, data, out, stage="kto", learning_rate=5e-3, max_steps=8, val_size=8, bf16=False))
    records = train_records(out)
    assert sorted(records) == list(range(1, 9))
    for record in records.values():
        assert {"rewards/chosen", "rewards/rejected", "kl"} <= set(record), sorted(record)
        assert record["kl"] >= 0
    losses = [records[s]["loss"] for s in range(1, 9)]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    before, after = eval_results(out)["before"], eval_results(out)["after"]
    assert {"rewards/chosen", "rewards/rejected", "kl"} <= set(after)
    assert after["loss"] < before["loss"]
    assert after["rewards/chosen"] > after["rewards/rejected"]


def test_kto_pref_ftx_adds_an_sft_term(tiny_qwen, tmp_path):
    data = write_jsonl(tmp_path / "kto.jsonl", kto_records())
    losses = {}
    for ftx in (0.0, 1.0):
        out = tmp_path / f"ftx-{ftx}"
        run_stage(make_cfg(tiny_qwen, data, out, stage="kto", pref_ftx=ftx, max_steps=1, bf16=False))
        losses[ftx] = train_records(out)[1]["loss"]
    assert losses[1.0] > losses[0.0] + 0.1  # plus the desirable answers' mean token NLL (several nats here)


def test_kto_record_without_tag_is_one_line_error(tiny_qwen, tmp_path, capsys):
    records = kto_records()[:3]
    del records[1]["kto_tag"]
    data = write_jsonl(tmp_path / "kto.jsonl", records)
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in dict(
        model_name_or_path=str(tiny_qwen), stage="kto", dataset=str(data), output_dir=str(out), max_steps=1,
        report_to="none", plot_loss=False).items()), encoding="utf-8")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "kto.jsonl line 2" in err[0] and "'kto_tag'" in err[0], err[0]
    assert not out.exists()


# --- 6. rm ----------------------------------------------------------------------------------------------

def test_reward_model_trains_and_saves_its_value_head(tiny_qwen, tmp_path):
    from peft import PeftModel

    from r1tune.data.prepare import prepare_data
    from r1tune.models.loading import load_model, load_tokenizer
    from r1tune.models.value_head import load_value_head
    from r1tune.train.preference_stage import RewardModelLoss

    data = write_jsonl(tmp_path / "pairs.jsonl", arithmetic_pairs())
    out = tmp_path / "out"
    cfg = make_cfg(tiny_qwen, data, out, stage="rm", learning_rate=5e-3, max_steps=8, val_size=8, bf16=False)
    run_stage(cfg)
    records = train_records(out)
    losses = [records[s]["loss"] for s in range(1, 9)]
    assert losses[-1] < 0.5 * losses[0], losses
    evals = [r for r in read_log(out) if r["split"] == "eval"]
    assert evals and 0.0 <= evals[-1]["accuracy"] <= 1.0
    results = eval_results(out)
    assert {"accuracy", *REWARD_NAMES} <= set(results["after"])
    assert results["after"]["loss"] < results["before"]["loss"]

    hidden = json.loads((tiny_qwen / "config.json").read_text())["hidden_size"]
    with safe_open(str(out / "value_head.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["v_head.summary.bias", "v_head.summary.weight"]
        assert tuple(f.get_tensor("v_head.summary.weight").shape) == (1, hidden)
        assert tuple(f.get_tensor("v_head.summary.bias").shape) == (1,)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.keys() and not [k for k in f.keys() if "v_head" in k or "summary" in k]
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert "v_head" not in json.dumps(adapter_config.get("modules_to_save") or [])

    # the saved head is the trained one: base + saved adapter + saved head reproduce the held-out result
    tokenizer = load_tokenizer(str(tiny_qwen))
    val = prepare_data(cfg, tokenizer, say=lambda *a: None).val
    model = PeftModel.from_pretrained(load_model(str(tiny_qwen)), str(out)).eval()
    head = load_value_head(out)
    again = RewardModelLoss(model, tokenizer.pad_token_id, None, head).evaluate(model, val, 8, 0)
    assert again["rewards/margins"] == pytest.approx(results["after"]["rewards/margins"], abs=1e-4)
    assert again["accuracy"] == results["after"]["accuracy"]


# --- 7. LLaMA-Factory's example YAMLs, unchanged ----------------------------------------------------------

@pytest.mark.parametrize("name, saves", [("qwen3_lora_dpo", "saves/qwen3-4b/lora/dpo"),
                                         ("qwen3_lora_kto", "saves/qwen3-4b/lora/kto"),
                                         ("qwen3_lora_reward", "saves/qwen3-4b/lora/reward")])
def test_llamafactory_example_yaml_runs_unchanged(name, saves, tiny_qwen, tmp_path, monkeypatch):
    shutil.copytree(FIXTURES / "data", tmp_path / "data")
    yaml_path = FIXTURES / "examples" / f"{name}.yaml"
    before = yaml_path.read_bytes()
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(yaml_path), f"model_name_or_path={tiny_qwen}", "max_steps=2"]) == 0
    out = tmp_path / saves
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert [r["step"] for r in read_log(out) if r["split"] == "train"] == [2]
    assert eval_results(out)["global_step"] == 2
    if name.endswith("reward"):
        assert (out / "value_head.safetensors").is_file()
    assert yaml_path.read_bytes() == before


# --- 7. evaluation-driven callbacks and stage-specific config checks ------------------------------

def test_early_stopping_and_plateau_watch_a_reward_metric(tiny_qwen, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", arithmetic_pairs())
    out = tmp_path / "out"
    result = run_stage(make_cfg(tiny_qwen, data, out, stage="dpo", max_steps=4, val_size=8, eval_steps=1,
                                bf16=False, metric_for_best_model="rewards/margins", early_stopping_patience=5,
                                lr_plateau_patience=1))
    assert result.global_step == 4
    evals = [r for r in read_log(out) if r.get("split") == "eval"]
    assert len(evals) >= 3 and all("rewards/margins" in r for r in evals)


@pytest.mark.parametrize("keys, named", [
    ({"metric_for_best_model": "perplexity"}, "'metric_for_best_model' is 'perplexity'"),
    ({"generate_metrics_steps": 2}, "'generate_metrics_steps' is for sft and pt"),
    ({"long_samples": "chunk"}, "'long_samples: chunk' cannot be used with stage 'dpo'"),
    ({"packing": True}, "'packing' cannot be used with stage 'dpo'"),
])
def test_keys_a_pair_stage_cannot_honour_are_config_errors(keys, named, tiny_qwen, tmp_path):
    from r1tune.errors import UserError

    with pytest.raises(UserError, match=named.replace("(", r"\(")):
        make_cfg(tiny_qwen, tmp_path / "pairs.jsonl", tmp_path / "out", stage="dpo", val_size=8, **keys)


def test_kto_has_no_pair_accuracy_to_watch(tiny_qwen, tmp_path):
    from r1tune.errors import UserError

    with pytest.raises(UserError, match="'metric_for_best_model' is 'rewards/accuracies'"):
        make_cfg(tiny_qwen, tmp_path / "kto.jsonl", tmp_path / "out", stage="kto", val_size=8,
                 metric_for_best_model="rewards/accuracies")
    make_cfg(tiny_qwen, tmp_path / "kto.jsonl", tmp_path / "out", stage="kto", val_size=8, metric_for_best_model="kl")


@pytest.mark.parametrize("attn, packs", [("sdpa", True), ("eager", True), ("flash_attention_2", False)])
def test_pair_rows_pack_unless_flash_attention(attn, packs, tiny_qwen, monkeypatch):
    """Flash attention sees packed parts' boundaries only in one-row batches: pair rows stay apart there."""
    from r1tune.models.loading import load_model
    from r1tune.train import preference_stage

    monkeypatch.setattr(preference_stage, "mask_format", lambda name: attn)
    model = load_model(str(tiny_qwen))
    loss = preference_stage.DPOLoss(model, 0, None, None, "sigmoid", 0.1, 0.0, 0.0, 0.0)
    assert loss.packs is packs
    assert preference_stage.RewardModelLoss(model, 0, None, model.lm_head).packs is False
