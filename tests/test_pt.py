"""`stage: pt` end to end through the real CLI: plain-text files train (long documents chunked into
windows), the loss falls, the adapter and logs are saved, and the trained model continues text."""

import json

from r1tune.cli import main


def test_pretraining_run_learns_and_saves(tiny_qwen, tmp_path, capsys):
    sentence = "The river carries cold water from the mountains to the sea every spring. "
    (tmp_path / "docs.txt").write_text("\n".join(sentence * (1 + i % 5) for i in range(120)) + "\n", encoding="utf-8")
    run = tmp_path / "run.yaml"
    run.write_text(json.dumps(dict(model_name_or_path=str(tiny_qwen), stage="pt", dataset=str(tmp_path / "docs.txt"),
                                   output_dir=str(tmp_path / "out"), cutoff_len=48, val_size=8, max_steps=30,
                                   learning_rate=5e-3, lora_rank=8, logging_steps=5, eval_steps=15, report_to="none",
                                   plot_loss=False, seed=3)), encoding="utf-8")
    assert main(["data", "check", str(run)]) == 0
    checked = capsys.readouterr().out
    assert "long samples split into sliding windows" in checked  # 'auto' chunks pretraining text
    assert main(["train", str(run)]) == 0
    out = tmp_path / "out"
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in log if r.get("split") == "train"]
    evals = [r["loss"] for r in log if r.get("split") == "eval"]
    assert len(train) == 6 and train[-1] < 0.5 * train[0]
    assert len(evals) == 2 and evals[-1] < evals[0]
    assert (out / "adapter_model.safetensors").is_file() and "stage: pt" in (out / "r1tune_config.yaml").read_text()
    capsys.readouterr()
    assert main(["chat", str(out), "--prompt", "The river carries", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()
