"""The real CLI: bad input exits 2 with one clear sentence, LLaMA-Factory YAML trains, chat, tiny, env."""

import hashlib
import json
import re
import subprocess
import sys

import pytest

from r1tune.cli import main
from tests.conftest import write_jsonl

GOOD = {"instruction": "Is 12 even or odd?", "output": "<think>\nLast digit 2.\n</think>\n\neven"}


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "r1tune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def write_yaml(path, **keys):
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()), encoding="utf-8")
    return path


@pytest.fixture()
def run_file(tmp_path, tiny_ds):
    def make(data_records=None, data_text=None, **keys):
        data = tmp_path / "data.jsonl"
        if data_text is not None:
            data.write_text(data_text, encoding="utf-8")
        else:
            write_jsonl(data, data_records if data_records is not None else [GOOD] * 4)
        base = dict(model_name_or_path=str(tiny_ds), dataset=str(data), output_dir=str(tmp_path / "out"),
                    max_steps=1, report_to="none", plot_loss=False)
        return write_yaml(tmp_path / "run.yaml", **{**base, **keys})
    return make


BAD_CASES = {
    "missing data file": (dict(dataset="nope.jsonl"), "data file 'nope.jsonl' not found"),
    "malformed json": (dict(data_text=json.dumps(GOOD) + "\n{\"instruction\": \"x\", \"output\": }\n"),
                       "data.jsonl line 2: malformed JSON"),
    "missing field": (dict(data_records=[GOOD, {"instruction": "x"}]), "data.jsonl line 2: field 'output' is missing"),
    "empty field": (dict(data_records=[{"instruction": "x", "output": ""}]), "data.jsonl line 1: field 'output' is empty"),
    "roles out of order": (dict(data_records=[{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}]),
                           "data.jsonl line 1: message 1 has role 'user' after user"),
    "unknown template": (dict(template="deepseek-r2"), "unknown template 'deepseek-r2'"),
    "not a model": (dict(model_name_or_path="__DATA_DIR__"), r"is a folder but not a model \(no config.json in it\)"),
    "no such model path": (dict(model_name_or_path="./no/such/model"), "'./no/such/model' does not exist"),
    "unwritable output": (dict(output_dir="__DATA_FILE__/out"), "is not a writable folder"),
    "unknown key": (dict(lora_rnak=8), "unknown key 'lora_rnak' in .*run.yaml — did you mean 'lora_rank'"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_exits_2_with_one_sentence(case, run_file, tmp_path, capsys):
    keys, expected = BAD_CASES[case]
    keys = {k: (str(tmp_path) if v == "__DATA_DIR__" else v) for k, v in keys.items()}
    if keys.get("output_dir") == "__DATA_FILE__/out":
        keys["output_dir"] = str(tmp_path / "data.jsonl" / "out")
    config = run_file(**keys)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    import re
    assert re.search(expected, err[0]), err[0]
    assert not (tmp_path / "out").exists()


def test_real_process_exit_code_and_no_traceback(run_file, tmp_path):
    config = run_file(data_records=[GOOD, {"instruction": "x"}])
    result = run_cli("train", config)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "line 2: field 'output' is missing" in result.stderr
    assert not (tmp_path / "out").exists()
    assert run_cli("train", tmp_path / "missing.yaml").returncode == 2


def test_llamafactory_yaml_and_dataset_info_train(tmp_path, tiny_ds):
    """A LLaMA-Factory run file and data folder, unchanged."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_jsonl(data_dir / "parity_alpaca.json", [GOOD] * 12)
    (data_dir / "dataset_info.json").write_text(json.dumps({
        "parity": {"file_name": "parity_alpaca.json", "formatting": "alpaca",
                   "columns": {"prompt": "instruction", "response": "output"}}}))
    (tmp_path / "lf.yaml").write_text(f"""\
### model
model_name_or_path: {tiny_ds}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: parity
template: deepseekr1
cutoff_len: 256
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/tiny/lora/sft
logging_steps: 1
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none

### train
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
learning_rate: 1.0e-4
num_train_epochs: 1.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
""")
    result = run_cli("train", "lf.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "saves" / "tiny" / "lora" / "sft"
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()
    log = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["split"] == "train"] == [1, 2]  # 12 records / (4 × 2) → 2 steps


def test_chat_one_shot_shows_reasoning_apart(tmp_path, tiny_ds, parity_file):
    from r1tune.train.stages.sft import run_sft
    from tests.conftest import make_cfg

    run_sft(make_cfg(tiny_ds, parity_file, tmp_path / "out", max_steps=2))
    result = run_cli("chat", tmp_path / "out", "--prompt", "Is 7 even or odd?", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("[reasoning]\n")


def test_reasoning_printer_splits_stream():
    import io

    from r1tune.serve.chat import ReasoningPrinter

    out = io.StringIO()
    printer = ReasoningPrinter(out)
    for piece in ["The last ", "digit is 7.\n</th", "ink>", "\n\n", "odd"]:
        printer.feed(piece)
    printer.finish()
    assert out.getvalue() == "[reasoning]\nThe last digit is 7.\n\n[answer]\nodd\n"


def test_tiny_is_deterministic(tmp_path):
    digests = []
    for name in ("a", "b"):
        assert main(["tiny", str(tmp_path / name), "--arch", "llama", "--hidden-size", "64", "--layers", "1"]) == 0
        digests.append({f: hashlib.sha256((tmp_path / name / f).read_bytes()).hexdigest()
                        for f in ("model.safetensors", "tokenizer.json")})
    assert digests[0] == digests[1]


def test_tiny_deepseek_has_mla_and_moe(tiny_ds):
    config = json.loads((tiny_ds / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["n_routed_experts"] > 1
    assert config["n_shared_experts"] == 1 and config["kv_lora_rank"] > 0


def test_help_and_env(capsys):
    for command in ("train", "chat", "tiny", "env", "data"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "example: r1tune" in capsys.readouterr().out
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for row in ("transformers", "constraints.txt", "cpu AVX-512F", "cpu AVX-512 BF16", "cpu AMX",
                "torch cpu capability", "bitsandbytes cpu 4-bit", "extra [qlora]", "extra [serve]",
                "extra [export]", "extra [deepspeed]"):
        assert row in out, row


def test_env_real_process():
    result = run_cli("env")
    assert result.returncode == 0, result.stderr
    assert "cpu AMX" in result.stdout and "extra [serve]" in result.stdout
    assert "Traceback" not in result.stderr and "gemm_4bit" not in result.stderr  # bitsandbytes kept quiet


def test_data_check(run_file, capsys):
    assert main(["data", "check", str(run_file())]) == 0
    assert "4 records, 4 kept" in capsys.readouterr().out
