"""Validation prompts that training also has are found (exact and near, cached or not) and acted on."""

import json

import pytest

from r1tune.cli import main
from r1tune.data.kinds import Sample
from r1tune.data.leakage import Leakage, act_on_leakage, find_leakage, prompt_text
from r1tune.errors import UserError
from tests.conftest import write_jsonl

QUESTION = "Summarise the quarterly report on regional water quality for the board in three sentences"


def chat(where, question, answer="ok"):
    return Sample("chat", where, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}])


def test_prompt_text_is_what_the_model_is_asked():
    assert prompt_text(chat("a:1", "hi", "answer")) == "hi"
    assert prompt_text(Sample("text", "a:2", text="plain text")) == "plain text"
    pair = Sample("preference", "a:3", [{"role": "user", "content": "q"}], chosen="c", rejected="r")
    assert prompt_text(pair) == "q"


def test_find_leakage_counts_exact_and_near_with_places():
    train = [chat(f"t.jsonl:{i}", f"unrelated question number {i} about something else") for i in range(1, 40)]
    train.append(chat("t.jsonl:40", QUESTION.upper() + "  "))  # same after normalisation
    train.append(chat("t.jsonl:41", QUESTION.replace("three", "four")))
    val = [chat("v:1", QUESTION, "different answer"), chat("v:2", QUESTION.replace("board", "boards")),
           chat("v:3", "a question nobody asked in training at all")]
    leak = find_leakage(val, [train[:20], train[20:]])
    assert (leak.checked, leak.exact, leak.near) == (3, 1, 1)
    assert leak.examples[0] == ["v:1", "t.jsonl:40", "exact"] and leak.examples[1][0] == "v:2"
    assert "2 of 3 validation prompts" in leak.describe()


def test_act_on_leakage():
    leak = Leakage(10, 2, 1, [["v:1", "t:5", "exact"]])
    said = []
    act_on_leakage(leak, "warn", "run.yaml", said.append)
    assert len(said) == 1 and "3 of 10 validation prompts" in said[0] and "v:1 = t:5" in said[0]
    with pytest.raises(UserError, match="run.yaml: 3 of 10 validation prompts"):
        act_on_leakage(leak, "error", "run.yaml", said.append)
    act_on_leakage(leak, "ignore", "run.yaml", said.append)
    act_on_leakage(Leakage(10), "error", "run.yaml", said.append)
    assert len(said) == 1


@pytest.fixture()
def leaky_run(tmp_path, tiny_qwen):
    records = [{"instruction": f"What is {i} plus {i}? Answer with the number only, please.", "output": str(2 * i)}
               for i in range(60)]
    write_jsonl(tmp_path / "data.jsonl", records + records[:30])  # 30 exact repeats
    run = tmp_path / "run.yaml"
    run.write_text(json.dumps(dict(model_name_or_path=str(tiny_qwen), dataset=str(tmp_path / "data.jsonl"),
                                   output_dir=str(tmp_path / "out"), val_size=20, max_steps=1, cutoff_len=64,
                                   report_to="none", plot_loss=False)), encoding="utf-8")
    return run


@pytest.mark.parametrize("cache", ["true", "false"])
def test_train_refuses_a_leaking_split_when_asked(leaky_run, tmp_path, capsys, cache):
    assert main(["train", str(leaky_run), "val_leakage=error", f"data_cache={cache}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "validation prompts are also training prompts" in err
    assert not (tmp_path / "out").exists()


def test_data_check_warns_by_default_and_cache_keeps_the_finding(leaky_run, capsys):
    for _ in range(2):  # build the cache entry, then reuse it
        assert main(["data", "check", str(leaky_run)]) == 0
        out = capsys.readouterr().out
        assert "warning:" in out and "validation prompts are also training prompts" in out
    assert "reusing tokenized cache" in out
    assert main(["data", "check", str(leaky_run), "val_leakage=ignore"]) == 0
    assert "warning:" not in capsys.readouterr().out


def test_cached_and_in_memory_splits_agree(leaky_run, tiny_qwen):
    from transformers import AutoTokenizer

    from r1tune.config import load_config
    from r1tune.data.prepare import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    found = [prepare_data(load_config(leaky_run, [f"data_cache={c}"]), tokenizer, say=lambda *a: None).report.leakage
             for c in ("true", "false")]
    assert found[0] == found[1] and found[0].leaked > 0


def test_quickstart_split_holds_out_only_new_prompts(tmp_path):
    """The README's held-out figures measure generalisation: no validation prompt is a training prompt."""
    from r1tune.config import load_config
    from r1tune.data.prepare import prepare_data
    from r1tune.data.dedup import find_duplicates
    from r1tune.models.tiny import build_tokenizer
    from tests.conftest import PARITY, ROOT

    records = [json.loads(line) for line in PARITY.read_text(encoding="utf-8").splitlines()]
    prompts = find_duplicates([r["messages"][0]["content"] for r in records])
    assert prompts.exact_groups == [] and prompts.near_pairs == []
    cfg = load_config(ROOT / "examples" / "quickstart.yaml", [f"output_dir={tmp_path}"])
    tokenizer = build_tokenizer()
    data = prepare_data(cfg, tokenizer, say=lambda *a: None)
    assert len(data.val) == 100 and data.report.leakage == Leakage(100, 0, 0, [])
    assert cfg.val_leakage == "warn"  # the default: a leaking split is reported
