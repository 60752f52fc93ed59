"""`r1tune data check|stats|preview` show each stage's view of its data: dpo / rm pairs as a chosen and a
rejected row, kto answers with their kto_tag; a bad preference record stops them with training's one-line
error; packing is refused for the stages that score whole rows."""

import json

import pytest

from r1tune.cli import main
from r1tune.config import validate_config
from r1tune.data.encode import IGNORE
from r1tune.errors import UserError
from tests.conftest import write_jsonl


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def _config(tmp_path, model, data, **keys):
    raw = dict(model_name_or_path=str(model), dataset=str(data), output_dir=str(tmp_path / "out"), cutoff_len=64,
               **keys)
    path = tmp_path / "run.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in raw.items()), encoding="utf-8")
    return path


PAIRS = [{"instruction": "What is 2 plus 3?", "chosen": "The answer is 5.", "rejected": "No idea."},
         {"instruction": "What is 1 plus 1?", "chosen": "It is 2.", "rejected": "Probably " + "three " * 80}]


def _trained_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE])


def _prompt(row) -> list[int]:
    return row["input_ids"][:next(i for i, label in enumerate(row["labels"]) if label != IGNORE)]


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_preview_shows_a_pair_as_its_chosen_and_rejected_rows(stage, tmp_path, tiny_ds, tokenizer, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = _config(tmp_path, tiny_ds, data, stage=stage)
    assert main(["data", "preview", str(config), "-n", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["where"].rsplit(" ", 1)[-1], r["kind"], r["view"]) for r in rows] == [
        ("1", "preference", "chosen"), ("1", "preference", "rejected"),
        ("2", "preference", "chosen"), ("2", "preference", "rejected")]
    chosen, rejected = rows[0], rows[1]
    assert _prompt(chosen) == _prompt(rejected)  # the same prompt, each row trains its own answer only
    assert "What is 2 plus 3?" in tokenizer.decode(_prompt(chosen))
    assert _trained_text(tokenizer, chosen).startswith("The answer is 5.")
    assert _trained_text(tokenizer, rejected).startswith("No idea.")
    assert rows[3]["over_cutoff"] and not rows[2]["over_cutoff"]
    assert main(["data", "preview", str(config), "-n", "1", "--plain"]) == 0
    out = capsys.readouterr().out
    assert "(preference, chosen)" in out and "(preference, rejected)" in out
    assert "⟦The answer is 5." in out and "⟦No idea." in out


def test_preview_shows_kto_answers_with_their_tag(tmp_path, tiny_ds, tokenizer, capsys):
    records = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                             {"role": "assistant", "content": f"Answer {i}."}], "kto_tag": i % 2 == 0}
               for i in range(3)]
    config = _config(tmp_path, tiny_ds, write_jsonl(tmp_path / "kto.jsonl", records), stage="kto")
    assert main(["data", "preview", str(config), "-n", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["kind"], r["view"], r["label"]) for r in rows] == [("kto", "answer", "true"), ("kto", "answer", "false"),
                                                                  ("kto", "answer", "true")]
    assert _trained_text(tokenizer, rows[1]).startswith("Answer 1.")
    assert main(["data", "preview", str(config), "-n", "2", "--plain"]) == 0
    out = capsys.readouterr().out
    assert "(kto, answer, kto_tag true)" in out and "(kto, answer, kto_tag false)" in out
    assert main(["data", "stats", str(config), "--plot", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "kto_tag true (desirable)" in out and "kto_tag false (undesirable)" in out


def test_stats_count_pairs_and_measure_both_rows(tmp_path, tiny_ds, tokenizer, capsys):
    from r1tune.config import load_config
    from r1tune.data.dataset import encode_sample, load_samples

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = _config(tmp_path, tiny_ds, data, stage="rm")
    assert main(["data", "stats", str(config), "--json", "--plot", str(tmp_path / "h.png")]) == 0
    stats = json.loads(capsys.readouterr().out)
    cfg = load_config(config)
    pairs = [encode_sample(tokenizer, s, cfg.empty_think) for s in load_samples(str(data), ".", stage="rm")]
    chosen = [len(p.chosen.input_ids) for p in pairs]
    rejected = [len(p.rejected.input_ids) for p in pairs]
    assert stats["records"] == stats["pairs"] == 2 and stats["kinds"] == {"preference": 2}
    assert stats["rows"]["chosen"]["max"] == max(chosen) and stats["rows"]["chosen"]["min"] == min(chosen)
    assert stats["rows"]["rejected"]["max"] == max(rejected) and stats["rows"]["rejected"]["min"] == min(rejected)
    assert rejected[1] > 64 > chosen[1]  # only the second pair's rejected row is over cutoff_len...
    assert stats["over_cutoff"] == 1  # ...and it counts: a pair is as long as its longer row
    assert stats["tokens"]["max"] == max(chosen + rejected)
    assert main(["data", "stats", str(config), "--plot", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "pairs (chosen + rejected rows)" in out and "rejected row tokens" in out


@pytest.mark.parametrize("action", ["check", "stats", "preview"])
@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_a_pair_without_rejected_is_trainings_one_line_error(action, stage, tmp_path, tiny_ds, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], {"instruction": "What is 2 plus 2?", "chosen": "4."}])
    config = _config(tmp_path, tiny_ds, data, stage=stage)
    assert main(["data", action, str(config), "--plot", str(tmp_path / "h.png")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), captured.err
    assert "pairs.jsonl line 2" in err[0] and "field 'rejected' is missing" in err[0], err[0]


def test_kto_record_without_tag_stops_data_check(tmp_path, tiny_ds, capsys):
    record = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}
    data = write_jsonl(tmp_path / "kto.jsonl", [{**record, "kto_tag": True}, record])
    config = _config(tmp_path, tiny_ds, data, stage="kto")
    for action in ("check", "preview"):
        assert main(["data", action, str(config)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "kto.jsonl line 2" in err[0] and "'kto_tag'" in err[0], err


@pytest.mark.parametrize("key", ["packing", "neat_packing"])
@pytest.mark.parametrize("stage", ["dpo", "kto", "rm"])
def test_packing_is_a_config_error_for_stages_that_score_whole_rows(key, stage):
    raw = dict(model_name_or_path="m", dataset="d.jsonl", stage=stage, **{key: True})
    with pytest.raises(UserError) as info:
        validate_config(raw, source="run.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("run.yaml: ")
    assert f"'{key}'" in message and f"stage '{stage}'" in message, message


def test_packing_still_works_for_sft_and_pt():
    for stage in ("sft", "pt"):
        assert validate_config(dict(model_name_or_path="m", stage=stage, packing=True)).use_packing
