"""Record kinds (text, preference, KTO, classification, tool turns), the registry schema and mixing."""

import json

import pytest

from r1tune.data.dataset import load_samples, mix_sources, parse_probs, take_num_samples
from r1tune.data.formats import FormatSpec
from r1tune.data.kinds import to_sample
from r1tune.errors import UserError
from tests.conftest import write_jsonl

PROMPT = [{"role": "user", "content": "Q"}]


def test_text_and_txt_files(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "third"}])
    samples = load_samples(f"{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}", "data", stage="pt")
    assert [s.text for s in samples] == ["first doc", "second doc", "third"]
    assert samples[1].where.endswith("a.txt line 3") and {s.kind for s in samples} == {"text"}


def test_text_under_sft_says_use_pt(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "third"}])
    with pytest.raises(UserError, match=r"b.jsonl line 1: the record is plain text.*stage 'sft' does not train on: set 'stage: pt'"):
        load_samples(str(tmp_path / "b.jsonl"), "data", stage="sft")


def test_preference_alpaca_sharegpt_and_trl_forms():
    alpaca = to_sample({"instruction": "Q", "chosen": "good", "rejected": "bad"}, FormatSpec(), "r")
    sharegpt = to_sample({"conversations": [{"from": "human", "value": "Q"}],
                          "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}},
                         FormatSpec("sharegpt", ranking=True), "r")
    trl = to_sample({"chosen": PROMPT + [{"role": "assistant", "content": "good"}],
                     "rejected": PROMPT + [{"role": "assistant", "content": "bad"}]}, FormatSpec(), "r")
    for sample in (alpaca, sharegpt, trl):
        assert (sample.kind, sample.messages, sample.chosen, sample.rejected) == ("preference", PROMPT, "good", "bad")


@pytest.mark.parametrize("record, message", [
    ({"instruction": "Q", "chosen": "same", "rejected": "same"}, "are identical"),
    ({"instruction": "Q", "chosen": "good", "rejected": 3}, "field 'rejected' is not an answer"),
    ({"chosen": PROMPT + [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}, "share every message"),
])
def test_bad_preference_records(record, message):
    with pytest.raises(UserError, match=message):
        to_sample(record, FormatSpec(), "data.jsonl line 4")


def test_kto_and_classification():
    kto = to_sample({"messages": PROMPT + [{"role": "assistant", "content": "A"}], "kto_tag": False}, FormatSpec(), "r")
    assert (kto.kind, kto.label) == ("kto", "false")
    cls = to_sample({"text": "great product", "label": 1}, FormatSpec(), "r")
    assert (cls.kind, cls.label, cls.messages[-1]) == ("cls", "1", {"role": "assistant", "content": "1"})
    with pytest.raises(UserError, match="field 'kto_tag' must be true or false"):
        to_sample({"instruction": "Q", "output": "A", "kto_tag": "yes"}, FormatSpec(), "r")
    with pytest.raises(UserError, match="r: field 'label' must be a non-empty string or integer"):
        to_sample({"text": "t", "label": None}, FormatSpec(), "r")


def test_sharegpt_tools_and_function_turns():
    record = {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "18C"},
        {"from": "gpt", "value": "It is 18C."}],
        "tools": json.dumps([{"name": "weather", "parameters": {"type": "object"}}])}
    sample = to_sample(record, FormatSpec("sharegpt"), "r")
    roles = [m["role"] for m in sample.messages]
    assert roles == ["user", "assistant", "tool", "assistant"] and sample.tools[0]["name"] == "weather"
    assert sample.messages[1]["tool_calls"][0]["function"] == {"name": "weather", "arguments": {"city": "Paris"}}
    bad = dict(record, conversations=[record["conversations"][0], {"from": "function_call", "value": "weather(Paris)"}])
    with pytest.raises(UserError, match=r"conversations\[1\]: a function call must be JSON"):
        to_sample(bad, FormatSpec("sharegpt"), "r")
    with pytest.raises(UserError, match="field 'tools' is not valid JSON"):
        to_sample(dict(record, tools="[{"), FormatSpec("sharegpt"), "r")


def test_tool_turns_refused_by_a_template_without_tools(tokenizer):
    from r1tune.data.dataset import encode_sample

    sample = to_sample({"messages": [
        {"role": "user", "content": "Weather?"}, {"role": "function_call", "content": '{"name": "weather", "arguments": {}}'},
        {"role": "tool", "content": "18C"}, {"role": "assistant", "content": "Warm."}]}, FormatSpec("openai"), "d line 2")
    with pytest.raises(UserError, match="d line 2: the chat template does not render tool calls"):
        encode_sample(tokenizer, sample, "mask")


def _registry(tmp_path, info: dict) -> str:
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return str(tmp_path)


def test_registry_full_schema(tmp_path):
    write_jsonl(tmp_path / "pref.jsonl", [{"q": "Q", "good": "g", "bad": "b"}])
    write_jsonl(tmp_path / "kto.jsonl", [{"instruction": "Q", "output": "A", "ok": True}])
    (tmp_path / "docs").mkdir()
    write_jsonl(tmp_path / "docs" / "1.jsonl", [{"content": "x"}])
    (tmp_path / "docs" / "2.txt").write_text("y\n", encoding="utf-8")
    folder = _registry(tmp_path, {
        "pref": {"file_name": "pref.jsonl", "ranking": True, "columns": {"prompt": "q", "chosen": "good", "rejected": "bad"}},
        "kto": {"file_name": "kto.jsonl", "columns": {"kto_tag": "ok"}},
        "docs": {"file_name": "docs", "columns": {"prompt": "content"}, "num_samples": 5}})
    pref, kto = load_samples("pref,kto", folder)
    assert (pref.kind, pref.chosen, kto.kind, kto.label) == ("preference", "g", "kto", "true")
    docs = load_samples("docs", folder, stage="pt")
    assert len(docs) == 5 and {s.text for s in docs} == {"x", "y"}


@pytest.mark.parametrize("entry, message", [
    ({"file_name": "a.jsonl", "columns": {"promt": "q"}}, "unknown name 'promt' in 'columns' — did you mean 'prompt'"),
    ({"file_name": "a.jsonl", "tags": {"role": "from"}}, "unknown name 'role' in 'tags'"),
    ({"file_name": "a.jsonl", "columns": {"images": "img"}}, "images/video/audio"),
    ({"file_name": "a.jsonl", "num_samples": 0}, "'num_samples' must be a positive whole number"),
    ({"file_name": "nothere.jsonl"}, "data file .*nothere.jsonl' not found"),
    ({"hf_hub_url": "x/y"}, "'hf_hub_url' needs a download"),
])
def test_registry_errors(tmp_path, entry, message):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Q", "output": "A"}])
    folder = _registry(tmp_path, {"d": entry})
    with pytest.raises(UserError, match=message):
        load_samples("d", folder)


def test_max_samples_per_dataset(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "A"} for i in range(5)])
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": "B"} for i in range(5)])
    samples = load_samples(f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}", "data", max_samples=2)
    assert [s.messages[0]["content"] for s in samples] == ["a0", "a1", "b0", "b1"]


def test_interleave_probabilities_and_strategies():
    a, b = [f"a{i}" for i in range(1000)], [f"b{i}" for i in range(100)]
    under = mix_sources([a, b], "interleave_under", [0.5, 0.5], seed=0)
    assert under[-1] == "b99" and 150 < len(under) < 260  # stops when b runs out
    over = mix_sources([a, b], "interleave_over", [0.5, 0.5], seed=0)
    assert set(a) <= set(over) and over.count("b0") >= 5  # b repeats until a is used up
    assert mix_sources([a, b], "interleave_under", [0.5, 0.5], seed=0) == under  # seeded
    weighted = mix_sources([a, [f"c{i}" for i in range(1000)]], "interleave_under", [0.8, 0.2], seed=1)
    share = sum(x.startswith("a") for x in weighted) / len(weighted)
    assert abs(share - 0.8) < 0.03 and weighted[-1] == "a999"  # the 0.8 source runs out first
    assert mix_sources([a, b], "concat", [0.5, 0.5], seed=0) == a + b
    with pytest.raises(UserError, match="'interleave_probs' needs 2 non-negative numbers"):
        parse_probs("0.5", 2)


def test_num_samples_up_and_down():
    items = list(range(10))
    assert sorted(take_num_samples(items, 4, seed=0)) == sorted(set(take_num_samples(items, 4, seed=0)))
    big = take_num_samples(items, 25, seed=0)
    assert len(big) == 25 and all(big.count(i) >= 2 for i in items)


def test_num_samples_is_drawn_before_max_samples(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "output": "A"} for i in range(10)])
    folder = _registry(tmp_path, {"a": {"file_name": "a.jsonl", "num_samples": 30}})
    samples = load_samples("a", folder, max_samples=12)
    assert len(samples) == 12 and len({s.messages[0]["content"] for s in samples}) > 2


def test_a_template_that_fails_on_a_record_is_one_sentence(tokenizer, tmp_path):
    import copy

    from r1tune.data.dataset import encode_sample

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}"
    sample = to_sample({"instruction": "Q", "output": "A"}, FormatSpec(), "d.jsonl line 9")
    with pytest.raises(UserError, match=r"d.jsonl line 9: the chat template fails on this record \(TypeError"):
        encode_sample(tok, sample, "mask")
