"""stage: grpo end to end on tiny models: prompt records in every format, the config's checks, each
loss_type against its formula over a whole optimizer step, the ratio-1 policy gradient, the adapter-off
reference against a frozen copy, reproducible rollouts through the batched decoder, TRL's metric
names and files, reward functions from files (and a broken one), the guards, and exact resume."""

import copy
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from r1tune.data.dataset import load_samples
from r1tune.errors import UserError
from r1tune.train.logs import read_log
from r1tune.train.stages.registry import run_stage
from tests.conftest import make_cfg, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest

TRL_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/max_length",
               "completions/clipped_ratio", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
               "clip_ratio/region_mean")


def prompts(n=24):
    return [{"instruction": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(1, 7) for b in range(1, 5)][:n]


def grpo_cfg(model, data, out, **keys):
    base = dict(stage="grpo", reward_funcs=["think_format", "accuracy"], num_generations=4,
                per_device_train_batch_size=8, max_completion_length=12, max_steps=3, bf16=False)
    return make_cfg(model, data, out, **{**base, **keys})


def train_records(out):
    return {r["step"]: r for r in read_log(out) if r["split"] == "train"}


REWARD_FILE = '''
def echo_answer(prompts, completions, completion_ids, answer, **kwargs):
    """TRL style: one float per completion; checks what it is handed."""
    assert len(prompts) == len(completions) == len(completion_ids) == len(answer)
    assert all(isinstance(ids, list) and all(isinstance(t, int) for t in ids) for ids in completion_ids)
    assert kwargs["trainer_state"].global_step >= 0
    return [float(len(c) % 3) for c in completions]


def too_few(prompts, completions, **kwargs):
    return [1.0] * 3


def constant(completions, **kwargs):
    return [1.0] * len(completions)


def zero(completions, **kwargs):
    return [0.0] * len(completions)
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FILE, encoding="utf-8")
    return path


# --- data and config -------------------------------------------------------------------------------

def test_prompt_records_in_every_format(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "p.jsonl", [
        {"instruction": "What is 2+3?", "input": "Be brief.", "output": "ignored", "answer": "5"},
        {"messages": [{"role": "user", "content": "What is 4+4?"}], "answer": "8"},
        {"conversations": [{"from": "human", "value": "1+1?"}, {"from": "gpt", "value": "2"}], "solution": "2"},
        {"prompt": "What is 9-3?", "answer": "6"},
        {"prompt": [{"role": "system", "content": "brief"}, {"role": "user", "content": "7*2?"}], "answer": "14",
         "level": 3},
    ])
    samples = load_samples(str(data), ".", stage="grpo")
    assert [s.messages[-1] for s in samples] == [
        {"role": "user", "content": "What is 2+3?\nBe brief."}, {"role": "user", "content": "What is 4+4?"},
        {"role": "user", "content": "1+1?"}, {"role": "user", "content": "What is 9-3?"},
        {"role": "user", "content": "7*2?"}]
    assert [s.columns for s in samples] == [{"output": "ignored", "answer": "5"}, {"answer": "8"}, {"solution": "2"},
                                           {"answer": "6"}, {"answer": "14", "level": 3}]
    assert [s.conversational for s in samples] == [False, True, True, False, True]
    assert samples[4].messages[0] == {"role": "system", "content": "brief"}

    from r1tune.data.dataset import encode_many

    examples = encode_many(tokenizer, samples, "mask")
    assert all(e.text.endswith("<｜Assistant｜><think>\n") for e in examples)  # the R1 template opens <think>
    assert examples[0].prompt == examples[0].text and examples[1].prompt == samples[1].messages
    assert tokenizer.decode(examples[3].input_ids) == examples[3].text


def test_long_prompts_are_dropped_and_counted(tiny_qwen, tmp_path):
    from r1tune.data.prepare import prepare_data
    from transformers import AutoTokenizer

    data = write_jsonl(tmp_path / "p.jsonl", prompts(6) + [{"instruction": "word " * 200, "answer": "1"}])
    cfg = grpo_cfg(tiny_qwen, data, tmp_path / "out", cutoff_len=64)
    prepared = prepare_data(cfg, AutoTokenizer.from_pretrained(tiny_qwen), say=lambda *_: None)
    assert len(prepared.train) == 6
    assert prepared.report.dropped == {"prompt longer than cutoff_len": 1}


@pytest.mark.parametrize("keys, message", [
    ({"per_device_train_batch_size": 6}, "multiple of 'num_generations' (4)"),
    ({"reward_funcs": None}, "needs 'reward_funcs'"),
    ({"reward_weights": [1.0]}, "1 weights for 2 reward_funcs"),
    ({"packing": True}, "'packing' cannot be used with stage 'grpo'"),
])
def test_config_problems(keys, message, tiny_qwen, tmp_path):
    with pytest.raises(UserError, match=re.escape(message)):
        grpo_cfg(tiny_qwen, tmp_path / "p.jsonl", tmp_path / "out", **keys)


def test_trl_spellings(tiny_qwen, tmp_path):
    cfg = grpo_cfg(tiny_qwen, tmp_path / "p.jsonl", tmp_path / "out", scale_rewards=False,
                   reward_funcs="think_format, accuracy")
    assert cfg.scale_rewards == "none" and cfg.reward_funcs == ["think_format", "accuracy"]
    assert cfg.best_metric == "reward" and cfg.loss_type == "dapo" and cfg.beta == 0.0


# --- the loss over an optimizer step -----------------------------------------------------------------

def _stage(model, tokenizer, loss_type, beta=0.0, repeats=1, max_len=6):
    from r1tune.train.grpo_stage import GRPOLoss, Settings

    settings = Settings(num_generations=2, max_completion_length=max_len, temperature=0.7, top_p=1.0, beta=beta,
                        loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, num_iterations=repeats,
                        scale_rewards="group", mask_truncated_completions=False, reward_weights=None,
                        generation_batch_rows=8, num_completions_to_print=1, seed=0)
    return GRPOLoss(model, tokenizer, settings, [])


def _rollouts(stage, gen, batches=2, per_batch=4, max_len=6):
    """Random rollouts in `batches` batches, with per-token old / reference log-probabilities."""
    from r1tune.train.grpo_losses import token_weights
    from r1tune.train.grpo_stage import Rollout

    out = []
    for _ in range(batches):
        items = []
        for _ in range(per_batch):
            prompt = torch.randint(5, 1600, (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen).tolist()
            n = int(torch.randint(1, max_len + 1, (1,), generator=gen))
            completion = torch.randint(5, 1600, (n,), generator=gen).tolist()
            old = (-torch.rand(n, generator=gen) * 6 - 1).tolist()
            ref = (-torch.rand(n, generator=gen) * 6 - 1).tolist()
            items.append(Rollout(prompt + completion, len(prompt), float(torch.randn(1, generator=gen)), 0.0, 0.0,
                                 True, old, ref))
        lengths = [len(r.completion) for r in items]
        weights, units = token_weights(stage.s.loss_type, lengths, sum(lengths), max_len)
        for r, w, u in zip(items, weights, units):
            r.weight, r.unit = w, u
        out.append(items)
    return out


def _policy_logps(model, rollout, temperature):
    """Each completion token's log-probability from a plain forward of its row alone."""
    ids = torch.tensor([rollout.input_ids])
    logits = model(input_ids=ids).logits[0, :-1].float() / temperature
    logps = logits.log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
    return logps[rollout.prompt_len - 1:]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_step_loss_equals_the_formula(loss_type, tiny_qwen, tokenizer):
    """Cut into micro-batches however, sum(loss) / sum(units) over a step is the loss type's formula."""
    from transformers import AutoModelForCausalLM

    from r1tune.train.grpo_losses import token_terms

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen).eval()
    stage = _stage(model, tokenizer, loss_type, beta=0.04, repeats=2)
    step = _rollouts(stage, torch.Generator().manual_seed(1))
    with torch.no_grad():
        pieces = [part for batch in step for part in stage.split(batch, 24)]  # several micro-batches
        assert len(pieces) > 2
        total = sum(stage.loss(model, stage.collate(p))[0] for p in pieces)
        units = sum(stage.units(stage.collate(p)) for p in pieces)
        got = float(total / units)
        per_completion = []  # (batch, completion) -> per-token losses by the formula
        for b, batch in enumerate(step):
            for r in batch:
                logps = _policy_logps(model, r, 0.7)
                terms, _ = token_terms(logps, torch.tensor(r.old_logps), torch.tensor(r.advantage), 0.2, 0.28, 0.04,
                                       torch.tensor(r.ref_logps))
                per_completion.append((b, terms))
    sums = [float(t.sum()) for _, t in per_completion]
    lens = [t.numel() for _, t in per_completion]
    if loss_type == "dapo":
        want = sum(sums) / sum(lens)
    elif loss_type == "grpo":
        want = sum(s / n for s, n in zip(sums, lens)) / len(sums)
    elif loss_type == "dr_grpo":
        want = sum(sums) / (len(sums) * 6)
    else:  # bnpo: each batch's token mean, averaged over the step's batches
        want = sum(sum(s for (b, _), s in zip(per_completion, sums) if b == k) /
                   sum(n for (b, _), n in zip(per_completion, lens) if b == k) for k in range(2)) / 2
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_one_batch_equals_policy_loss(loss_type, tiny_qwen, tokenizer):
    """One batch in one micro-batch: the stage's loss is grpo_losses.policy_loss (checked against TRL there)."""
    from transformers import AutoModelForCausalLM

    from r1tune.train.grpo_losses import policy_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen).eval()
    stage = _stage(model, tokenizer, loss_type, beta=0.04, repeats=2)
    (batch,) = _rollouts(stage, torch.Generator().manual_seed(2), batches=1)
    with torch.no_grad():
        collated = stage.collate(batch)
        got = float(stage.loss(model, collated)[0] / stage.units(collated))
        width = max(len(r.completion) for r in batch)
        pad = lambda rows: torch.stack([torch.nn.functional.pad(torch.as_tensor(x, dtype=torch.float32),
                                                                (0, width - len(x))) for x in rows])
        logps = pad([_policy_logps(model, r, 0.7) for r in batch])
        mask = pad([[1.0] * len(r.completion) for r in batch])
        want, _ = policy_loss(logps, pad([r.old_logps for r in batch]), torch.tensor([r.advantage for r in batch]),
                              mask, loss_type, 0.2, 0.28, 0.04, pad([r.ref_logps for r in batch]), 6)
    assert got == pytest.approx(float(want), rel=1e-4, abs=1e-6)


def test_num_iterations_one_is_the_policy_gradient(tiny_qwen, tokenizer):
    """Without old log-probabilities the ratio is 1: the loss is -mean(A) and its gradient that of -A log p."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    stage = _stage(model, tokenizer, "dapo")
    (batch,) = _rollouts(stage, torch.Generator().manual_seed(3), batches=1)
    collated = stage.collate(batch)
    assert "old_logps" not in collated
    loss, stats = stage.loss(model, collated)
    loss = loss / stage.units(collated)
    adv = collated["advantages"]
    assert float(loss.detach()) == pytest.approx(float(-adv.mean()), abs=1e-6)
    assert stats["clip_ratio/region_mean"][0] == 0
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    logps = torch.cat([_policy_logps(model, r, 0.7) for r in batch])
    expected = torch.autograd.grad(-(adv * logps).mean(), list(model.parameters()), allow_unused=True)
    for g, e in zip(grads, expected):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_adapter_off_reference_equals_a_frozen_copy(tiny_qwen, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from r1tune.train.reference import AdapterOff, FrozenCopy
    from r1tune.train.sequence_scores import SequenceScorer

    base = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    frozen = FrozenCopy(copy.deepcopy(base), None)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter, so the policy differs from the reference
    stage = _stage(model, tokenizer, "dapo")
    (batch,) = _rollouts(stage, torch.Generator().manual_seed(4), batches=1)
    collated = stage.collate(batch)
    scorer = SequenceScorer(model)
    off = AdapterOff().token_logps(model, scorer, collated, 0.7)
    copied = frozen.token_logps(model, scorer, collated, 0.7)
    torch.testing.assert_close(off, copied, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (scorer.token_logps(collated, 0.7)[0] - off).abs().max() > 1e-2


# --- rollouts ----------------------------------------------------------------------------------------

def test_rollouts_are_seeded_and_greedy_matches_generate(tiny_qwen, tokenizer):
    from transformers import AutoModelForCausalLM

    from r1tune.models.decode import complete, eos_ids_of
    from r1tune.models.sampling import Params

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen).eval()
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("What is 1 plus 2?", "Hi", "Name a colour")]
    eos = eos_ids_of(model, tokenizer)
    greedy = complete(model, ids, [Params(8) for _ in ids], eos, tokenizer.pad_token_id, max_rows=2)
    for prompt, done in zip(ids, greedy):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=sorted(eos),
                             pad_token_id=tokenizer.pad_token_id)
        assert done.ids == out[0, len(prompt):].tolist()[:len(done.ids)]
    sample = lambda seeds: [c.ids for c in complete(model, ids, [Params(8, 1.0, 0.9, s) for s in seeds], eos,
                                                    tokenizer.pad_token_id, max_rows=2)]
    assert sample([1, 2, 3]) == sample([1, 2, 3])
    assert sample([1, 2, 3]) != sample([4, 5, 6])


# --- whole runs ------------------------------------------------------------------------------------

def test_run_logs_trl_metrics_samples_and_plot(tiny_qwen, reward_file, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", prompts())
    out = tmp_path / "out"
    result = run_stage(grpo_cfg(tiny_qwen, data, out, val_size=4, beta=0.05, plot_loss=True, logging_steps=2,
                                reward_funcs=["think_format", "accuracy", f"{reward_file}:echo_answer", "length"]))
    assert result.global_step == 3
    records = train_records(out)
    assert sorted(records) == [2, 3]
    for name in TRL_METRICS + ("kl", "rewards/think_format/mean", "rewards/accuracy/std", "rewards/echo_answer/mean",
                               "rewards/length/mean"):
        assert name in records[2], name
    assert records[2]["rewards/echo_answer/mean"] > 0  # the file's function ran and scored
    samples = [json.loads(line) for line in (out / "completions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {s["step"] for s in samples} == {2, 3} and all("echo_answer" in s and "advantage" in s for s in samples)
    assert (out / "reward_curve.png").stat().st_size > 0 and (out / "adapter_model.safetensors").is_file()
    evals = [r for r in read_log(out) if r["split"] == "eval"]
    assert evals and "reward" in evals[-1] and "rewards/accuracy/mean" in evals[-1]
    results = json.loads((out / "eval_results.json").read_text(encoding="utf-8"))
    assert "reward" in results["before"] and "reward" in results["after"]


def test_trained_reward_model_scores_the_completions(tiny_qwen, tmp_path):
    """A `stage: rm` output folder as reward_funcs entry: each completion's reward is the value head on the
    last token of prompt + completion, as a model loaded independently from the folder scores it."""
    from peft import PeftModel

    from r1tune.models.loading import load_model, load_tokenizer
    from r1tune.models.value_head import load_value_head

    pairs = [{"instruction": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.", "rejected": "No idea."}
             for a in range(1, 7) for b in range(1, 5)]
    rm_dir = tmp_path / "rm"
    run_stage(make_cfg(tiny_qwen, write_jsonl(tmp_path / "pairs.jsonl", pairs), rm_dir, stage="rm", max_steps=2,
                       bf16=False))
    out = tmp_path / "out"
    run_stage(grpo_cfg(tiny_qwen, write_jsonl(tmp_path / "p.jsonl", prompts(8)), out, max_steps=1, logging_steps=1,
                       reward_funcs=[str(rm_dir)], num_completions_to_print=8))
    record = train_records(out)[1]
    samples = [json.loads(line) for line in (out / "completions.jsonl").read_text(encoding="utf-8").splitlines()]
    key = "rm:rm"
    assert f"rewards/{key}/mean" in record and samples and all(key in s for s in samples)

    tokenizer = load_tokenizer(str(tiny_qwen))  # the rm run saved the base tokenizer unchanged
    model = PeftModel.from_pretrained(load_model(str(tiny_qwen)), str(rm_dir)).eval()
    head = load_value_head(rm_dir)
    for s in samples:
        ids = torch.tensor([tokenizer(s["prompt"] + s["completion"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            last = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
            expected = float(head(last))
        assert s[key] == pytest.approx(expected, abs=1e-4)
    rewards = [s[key] for s in samples]
    assert max(rewards) > min(rewards)  # scores depend on the completion


def test_deepseek_v3_moe_full_finetune_runs(tiny_ds, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", prompts(8))
    out = tmp_path / "out"
    result = run_stage(grpo_cfg(tiny_ds, data, out, finetuning_type="full", max_steps=2, beta=0.1,
                                learning_rate=1e-4))
    assert result.global_step == 2 and "kl" in train_records(out)[2]


def _train_cli(tmp_path, keys):
    config = tmp_path / "run.yaml"
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()), encoding="utf-8")
    return subprocess.run([sys.executable, "-m", "r1tune", "train", str(config)], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_broken_reward_function_exits_2_naming_it(tiny_qwen, reward_file, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", prompts())
    out = tmp_path / "out"
    result = _train_cli(tmp_path, dict(model_name_or_path=str(tiny_qwen), stage="grpo", dataset=str(data),
                                       output_dir=str(out), reward_funcs=[f"{reward_file}:too_few"], num_generations=4,
                                       per_device_train_batch_size=8, max_completion_length=8, max_steps=2,
                                       report_to="none"))
    assert result.returncode == 2, result.stderr
    message = [line for line in (result.stdout + result.stderr).splitlines() if "'too_few'" in line]
    assert message and "returned 3 values for 8 completions" in message[0]
    assert "Traceback" not in result.stderr
    assert not list(out.glob("checkpoint-*")) and not (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("reward, keys, signal", [
    ("think_format", {"max_completion_length": 3}, "completions/clipped_ratio"),
    ("constant", {}, "frac_reward_zero_std"),
    ("zero", {}, "frac_reward_zero"),
])
def test_each_guard_fires(reward, keys, signal, tiny_qwen, reward_file, tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", prompts())
    spec = reward if reward == "think_format" else f"{reward_file}:{reward}"
    out = tmp_path / "out"
    result = run_stage(grpo_cfg(tiny_qwen, data, out, reward_funcs=[spec], grpo_guard="stop", grpo_guard_window=2,
                                max_steps=5, **keys))
    printed = capsys.readouterr().out.replace("\n", " ")
    assert "grpo_guard: for the last 2 rounds" in printed and f"({signal} " in printed
    assert result.stopped_early and result.global_step == 2 and (out / "checkpoint-2").is_dir()


@pytest.mark.parametrize("iterations", [1, 2])
def test_resume_equals_uninterrupted(iterations, tiny_qwen, tmp_path):
    """A crash after the step-3 checkpoint: resumed steps 4-6 log the same losses and rewards (with
    num_iterations 2, step 4 trains on the round generated before the crash, kept in the checkpoint)."""
    data = write_jsonl(tmp_path / "p.jsonl", prompts())
    keys = dict(max_steps=6, save_steps=3, num_iterations=iterations, temperature=1.0, learning_rate=2e-2,
                reward_funcs=["accuracy", "length"], max_completion_length=8)
    full = tmp_path / "full"
    run_stage(grpo_cfg(tiny_qwen, data, full, **keys))
    reference = train_records(full)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-3", crashed / "checkpoint-3")
    shutil.copy(full / "trainer_log.jsonl", crashed / "trainer_log.jsonl")
    run_stage(grpo_cfg(tiny_qwen, data, crashed, resume_from_checkpoint="auto", **keys))
    resumed = train_records(crashed)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert set(resumed[step]) == set(reference[step])
        for name in ("loss", "reward", "completions/mean_length", "entropy"):
            if name in reference[step]:
                assert resumed[step][name] == pytest.approx(reference[step][name], abs=1e-6), (step, name)
    assert reference[6]["entropy"] != reference[4]["entropy"]  # the run moved after the checkpoint


def test_router_balance_loss_joins_where_the_model_has_one(tiny_ds, tokenizer):
    """A Qwen2-MoE (router_aux_loss_coef) adds its load-balancing loss; the tiny DeepSeek-V3 has none."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    from r1tune.train.sequence_scores import router_aux

    config = Qwen2MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=32, shared_expert_intermediate_size=32, router_aux_loss_coef=0.5)
    torch.manual_seed(0)
    moe = Qwen2MoeForCausalLM(config).eval()
    stage = _stage(moe, tokenizer, "dapo")
    (batch,) = _rollouts(stage, torch.Generator().manual_seed(5), batches=1)
    collated = stage.collate(batch)
    with torch.no_grad():
        loss, stats = stage.loss(moe, collated)
        ids, mask = collated["input_ids"], collated["attention_mask"]
        want = moe(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss * 0.5
    assert stats["aux_loss"][0] == pytest.approx(float(want), rel=1e-5)
    assert float(loss) == pytest.approx(float(-collated["advantages"].sum() + want * stage.units(collated)), rel=1e-4)
    assert router_aux(AutoModelForCausalLM.from_pretrained(tiny_ds)) is None


def test_built_ins_read_the_rendered_prompt_of_conversational_records():
    """Conversational prompts reach reward functions as messages (as in TRL); think_format and accuracy
    still see that the R1 template opened <think>, through prompt_texts."""
    from r1tune.train.rewards import accuracy, think_format

    messages = [[{"role": "user", "content": "1+1?"}]]
    completions = [[{"role": "assistant", "content": "one plus one</think>2"}]]
    texts = ["<｜User｜>1+1?<｜Assistant｜><think>\n"]
    assert think_format(messages, completions, prompt_texts=texts) == [1.0]
    assert think_format(messages, completions) == [0.0]  # without the rendered prompt: no <think> seen
    assert accuracy(messages, completions, answer=["2"], prompt_texts=texts) == [1.0]


def test_leakage_compares_the_prompts_themselves(tiny_qwen, tmp_path):
    from transformers import AutoTokenizer

    from r1tune.data.prepare import prepare_data

    data = write_jsonl(tmp_path / "p.jsonl", prompts(24))
    cfg = grpo_cfg(tiny_qwen, data, tmp_path / "out", val_size=4)
    report = prepare_data(cfg, AutoTokenizer.from_pretrained(tiny_qwen), say=lambda *_: None).report
    assert report.leakage.checked == 4 and report.leakage.leaked == 0

