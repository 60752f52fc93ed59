"""`r1tune data stats` and `r1tune data preview` on crafted data."""

import json

from r1tune.cli import main
from r1tune.data.encode import IGNORE
from r1tune.data.stats import collect_stats
from r1tune.data.kinds import Sample
from tests.conftest import write_jsonl


def _config(tmp_path, model, data, **keys):
    raw = dict(model_name_or_path=str(model), dataset=str(data), output_dir=str(tmp_path / "out"), cutoff_len=64, **keys)
    path = tmp_path / "run.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in raw.items()), encoding="utf-8")
    return path


def test_stats_report_and_warnings(tmp_path, tiny_ds, capsys):
    records = [{"text": f"review number {i} was fine", "label": "positive"} for i in range(90)]
    records += [{"text": f"review {i} was bad", "label": "negative"} for i in range(10)]
    records += [{"text": "review 0 was bad", "label": "negative"}]  # exact duplicate
    records += [{"text": "a very long review " * 20, "label": "positive"}]  # over cutoff_len
    data = write_jsonl(tmp_path / "cls.jsonl", records)
    plot = tmp_path / "hist.png"
    assert main(["data", "stats", str(_config(tmp_path, tiny_ds, data)), "--json", "--plot", str(plot)]) == 0
    stats = json.loads(capsys.readouterr().out)  # stdout holds only the JSON
    assert stats["records"] == 102 and stats["kinds"] == {"cls": 102}
    assert stats["labels"] == {"positive": 91, "negative": 11} and abs(stats["negative_share"] - 11 / 102) < 1e-9
    assert stats["exact_duplicates"] == 1 and stats["near_duplicates"] >= 1 and stats["over_cutoff"] == 1
    assert stats["repeated_prompts"] >= 1  # the repeated review is also a repeated prompt
    warnings = " ".join(stats["warnings"])
    assert "only 102 samples" in warnings and "negative labels are 10.8%" in warnings
    assert plot.stat().st_size > 1000


def test_length_spread_warning_and_empty_answers():
    samples = [Sample("chat", "r", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nx\n</think>\n\n"}])]
    samples += [Sample("text", f"r{i}", text=f"text {i}") for i in range(9)]
    lengths = [10] * 8 + [400, 900]
    stats = collect_stats(samples, lengths, [5] * 10, cutoff_len=1000)
    assert stats.empty_answers == 1
    assert any("spread widely" in w for w in stats.warnings)
    even = collect_stats(samples, [100] * 10, [5] * 10, cutoff_len=1000)
    assert not any("spread widely" in w for w in even.warnings)


def test_preview_json_and_marked_text(tmp_path, tiny_ds, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Is 12 even?", "output": "<think>\n2 is even\n</think>\n\nyes"},
        {"instruction": "Q", "chosen": "good answer", "rejected": "bad answer"}])
    config = _config(tmp_path, tiny_ds, data)
    assert main(["data", "preview", str(config), "-n", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["kind"], r["view"]) for r in rows] == [("chat", "sample"), ("preference", "chosen"), ("preference", "rejected")]
    first = rows[0]
    assert len(first["input_ids"]) == len(first["labels"]) and first["labels"][0] == IGNORE
    assert first["trained_tokens"] == sum(label != IGNORE for label in first["labels"]) > 0
    assert main(["data", "preview", str(config), "-n", "1", "--plain"]) == 0
    out = capsys.readouterr().out
    assert "⟦2 is even" in out and out.count("⟦") == 2 and "<｜User｜>Is 12 even?" in out
