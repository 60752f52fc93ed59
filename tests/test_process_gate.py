"""The main-process gate (r1tune.process): a process of rank 1 trains silently and writes nothing;
rank 0 writes the run as usual. Every write and print of a run goes through is_main()."""

import json

import pytest

from r1tune.cli import main
from r1tune.process import is_main, rank
from r1tune.train.stages.registry import run_stage
from tests.conftest import make_cfg, write_jsonl


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def _records():
    return [{"instruction": f"What is {a} plus {b}?", "output": f"The answer is {a + b}."}
            for a in range(1, 5) for b in range(1, 5)]


def _run(tiny_qwen, tmp_path, **keys):
    data = write_jsonl(tmp_path / "data.jsonl", _records())
    out = tmp_path / "out"
    cfg = make_cfg(tiny_qwen, data, out, max_steps=2, save_steps=1, val_size=4, bf16=False,
                   report_to="tensorboard", plot_loss=True, **keys)
    return run_stage(cfg), out


def test_rank_follows_the_environment_on_every_call(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert rank() == 1 and not is_main()
    monkeypatch.setenv("RANK", "0")
    assert rank() == 0 and is_main()  # read each time, never cached
    monkeypatch.delenv("RANK")
    assert is_main()


def test_a_rank_1_process_writes_and_prints_nothing(tiny_qwen, tmp_path, monkeypatch, capfd):
    capfd.readouterr()  # whatever building the tiny model printed
    monkeypatch.setenv("RANK", "1")
    result, out = _run(tiny_qwen, tmp_path)
    assert result.global_step == 2  # it did train
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    assert written == [], written
    captured = capfd.readouterr()
    assert captured.out == "", captured.out
    assert captured.err == "", captured.err


def test_the_cli_on_rank_1_prints_no_notes_either(tiny_qwen, tmp_path, monkeypatch, capfd):
    """Config notices (a no-effect key, another stage's key) and library progress bars stay on rank 0."""
    data = write_jsonl(tmp_path / "data.jsonl", _records())
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    keys = dict(model_name_or_path=str(tiny_qwen), dataset=str(data), output_dir=str(out), max_steps=2,
                save_steps=1, per_device_train_batch_size=4, cutoff_len=64, bf16=False, dataloader_num_workers=2,
                pref_beta=0.2)
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()), encoding="utf-8")
    capfd.readouterr()
    monkeypatch.setenv("RANK", "1")
    assert main(["train", str(config)]) == 0
    captured = capfd.readouterr()
    assert (captured.out, captured.err) == ("", "")
    assert not out.exists()
    monkeypatch.setenv("RANK", "0")  # the same notes do show on the main process
    assert main(["train", str(config)]) == 0
    err = capfd.readouterr().err
    assert "ignoring 'dataloader_num_workers'" in err and "'pref_beta' applies to stage dpo / kto" in err, err
    assert (out / "adapter_model.safetensors").is_file()


def test_rank_0_writes_the_adapter_log_and_checkpoints(tiny_qwen, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("RANK", "0")
    result, out = _run(tiny_qwen, tmp_path)
    assert result.global_step == 2
    assert (out / "adapter_model.safetensors").is_file() and (out / "trainer_log.jsonl").is_file()
    assert (out / "checkpoint-1").is_dir() or (out / "checkpoint-2").is_dir()
    assert (out / "eval_results.json").is_file()
    assert "saved to" in capfd.readouterr().out
