"""Seeded text augmentation (r1tune.data.augment): determinism, targets, tables, languages, hooks, errors."""

from __future__ import annotations

import copy
import re
from importlib import resources

import pytest

from r1tune.data.augment import AugmentOptions, Augmenter, is_chinese
from r1tune.errors import UserError

EN = ("The quick customer found a huge mistake in the important invoice and the angry client wants "
      "a simple answer, so please explain the problem carefully and suggest a reliable method to fix it soon.")
ZH = "请快速解释这个错误，客户非常生气，我们需要立即处理。"
THINK = "<think>\nThe customer is angry about a huge mistake, so I should explain the problem quickly.\n</think>\n\n"
ANSWER = "The important thing is to fix the mistake quickly and give the angry client a simple answer."


def conv(user: str = EN, answer: str = THINK + ANSWER) -> list[dict]:
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer}]


def one_sentence(message: str) -> bool:
    return "\n" not in message and not re.search(r"[.!?]\s", message.rstrip("?"))


def alternation(words: list[str]) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


# --- determinism, epochs, targets --------------------------------------------------
def test_same_seed_epoch_index_gives_same_output_and_input_is_not_mutated():
    options = AugmentOptions(synonym_prob=0.4, insert_prob=0.1, shuffle_window=2, template_rotation=0.5)
    sample = conv()
    before = copy.deepcopy(sample)
    first = Augmenter(options)(sample, seed=7, epoch=2, index=11)
    assert sample == before
    assert first is not sample and first[1] is not sample[1]
    assert Augmenter(options)(sample, seed=7, epoch=2, index=11) == first  # a fresh Augmenter, same draw
    assert first[1]["content"] != EN
    assert first[0] == sample[0]  # the system message is never augmented


def test_each_epoch_draws_anew_and_seed_and_index_matter():
    augment = Augmenter(AugmentOptions(synonym_prob=0.5))
    by_epoch = [augment(conv(), seed=1, epoch=e, index=0)[1]["content"] for e in range(5)]
    assert len(set(by_epoch)) == 5
    assert augment(conv(), seed=2, epoch=0, index=0) != augment(conv(), seed=1, epoch=0, index=0)
    assert augment(conv(), seed=1, epoch=0, index=1) != augment(conv(), seed=1, epoch=0, index=0)


def test_targets_untouched_by_default_and_think_untouched_always():
    options = AugmentOptions(synonym_prob=1.0, insert_prob=0.3, shuffle_window=3)
    out = Augmenter(options)(conv(), seed=0, epoch=0, index=0)
    assert out[2]["content"] == THINK + ANSWER
    assert out[1]["content"] != EN

    options.augment_targets = True
    for epoch in range(3):
        target = Augmenter(options)(conv(), seed=0, epoch=epoch, index=0)[2]["content"]
        assert target.startswith(THINK)
        assert target[len(THINK):] != ANSWER


def test_reasoning_before_a_lone_closing_think_tag_is_kept():
    # Templates that open '<think>\n' in the prompt leave the reasoning without its opening tag.
    reasoning = "The customer is angry about a huge mistake.\n</think>\n\n"
    options = AugmentOptions(synonym_prob=1.0, augment_targets=True)
    target = Augmenter(options)(conv(answer=reasoning + ANSWER), seed=0, epoch=0, index=0)[2]["content"]
    assert target.startswith(reasoning) and target != reasoning + ANSWER


def test_tool_messages_and_tool_calls_are_copied_unchanged():
    sample = [{"role": "user", "content": "Please explain the huge mistake."},
              {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]},
              {"role": "tool", "content": "The important result is simple."},
              {"role": "assistant", "content": "The important result is simple."}]
    out = Augmenter(AugmentOptions(synonym_prob=1.0, augment_targets=True))(sample, seed=0, epoch=0, index=0)
    assert out[1] == sample[1] and out[2] == sample[2]
    assert out[3]["content"] != sample[3]["content"]


# --- English ------------------------------------------------------------------------
def test_english_synonyms_come_from_the_table_group():
    augment = Augmenter(AugmentOptions(synonym_prob=1.0))
    words = ["quick", "customer", "huge", "mistake", "important", "problem", "immediately"]
    pattern = r"\s".join(alternation(augment.table.alternatives(w)) for w in words)
    for epoch in range(10):
        text = augment(conv(user=" ".join(words)), seed=3, epoch=epoch, index=0)[1]["content"]
        assert re.fullmatch(pattern, text), text


def test_english_case_names_and_articles():
    augment = Augmenter(AugmentOptions(synonym_prob=1.0))
    text = augment(conv(user="Quick answers help. Ask Bill about a huge invoice."), seed=0, epoch=0, index=0)[1]["content"]
    first = text.split()[0]
    assert first[0].isupper() and first.lower() in augment.table.alternatives("quick")
    assert "Bill" in text  # a capitalised word inside a sentence is taken for a name
    # "a huge" -> "a vast" / "an enormous": the article follows the new word
    article, adjective = re.search(r"\b(an?) (\w+) (?:\w+)\.$", text).groups()
    assert adjective in augment.table.alternatives("huge")
    assert article == ("an" if adjective[0] in "aeiou" else "a")


def test_english_shuffle_moves_words_within_the_window_and_keeps_punctuation():
    text = "alpha beta gamma delta epsilon zeta eta theta, iota kappa lambda mu."
    augment = Augmenter(AugmentOptions(shuffle_window=2))
    changed = 0
    for epoch in range(20):
        out = augment(conv(user=text), seed=5, epoch=epoch, index=0)[1]["content"]
        head, tail = out.rstrip(".").split(", ")
        words, original = head.split() + tail.split(), text.rstrip(".").replace(",", "").split()
        assert sorted(head.split()) == sorted(original[:8]) and sorted(tail.split()) == sorted(original[8:])
        assert all(abs(words.index(w) - original.index(w)) <= 2 for w in original)
        changed += out != text
    assert changed >= 15


def test_numbers_urls_code_and_special_tokens_are_never_changed():
    protected = ["555-0100", "9:30", "2024-05-01", "https://example.com/help?id=42", "`pip install r1tune==0.1`",
                 "<｜User｜>", "support@example.com", "1,250.75", "config.yaml", "max_new_tokens", "<tool_call>"]
    text = ("Call 555-0100 before 9:30 on 2024-05-01 and visit https://example.com/help?id=42, then run "
            "`pip install r1tune==0.1` with <｜User｜> or write to support@example.com. The quick customer has a "
            "huge problem with the important invoice of $1,250.75 in config.yaml and max_new_tokens <tool_call> soon.")
    zh = "请快速处理100元的退款，访问https://example.cn/a?b=1了解详情，客户非常生气，订单号是A12345。"
    options = AugmentOptions(synonym_prob=1.0, insert_prob=0.5, shuffle_window=3)
    for epoch in range(10):
        out = Augmenter(options)(conv(user=text), seed=9, epoch=epoch, index=0)[1]["content"]
        assert out != text and all(p in out for p in protected), out
        out = Augmenter(options)(conv(user=zh), seed=9, epoch=epoch, index=0)[1]["content"]
        assert out != zh and all(p in out for p in ["100", "https://example.cn/a?b=1", "A12345"]), out


# --- Chinese ------------------------------------------------------------------------
def test_language_detection():
    assert is_chinese(ZH) and is_chinese("请解释 LoRA 的原理") and is_chinese("访问 https://example.com/a/b/c 查看")
    assert not is_chinese(EN) and not is_chinese("Translate 你好 into English, please")


def test_chinese_synonyms_replace_matched_words_and_keep_the_rest():
    augment = Augmenter(AugmentOptions(synonym_prob=1.0))
    pieces = ["请", "快速", "解释", "这个", "错误", "，", "客户", "非常", "生气", "，我们需要", "立即", "处理。"]
    matched = [p for p in pieces if augment.table.alternatives(p)]
    assert matched == ["快速", "解释", "错误", "客户", "非常", "生气", "立即"]
    pattern = "".join(alternation(augment.table.alternatives(p)) if p in matched else re.escape(p) for p in pieces)
    outputs = {augment(conv(user=ZH), seed=4, epoch=e, index=0)[1]["content"] for e in range(10)}
    assert len(outputs) > 1 and all(re.fullmatch(pattern, out) for out in outputs), outputs


def test_chinese_clause_shuffle_keeps_each_clause_and_sentence():
    first = "今天天气晴朗，我们去公园散步，孩子们在草地上玩耍、放风筝；大人们坐着聊天"
    second = "晚上大家一起回家，路上有说有笑。"
    text = first + "。" + second
    clauses = re.split("[，、；]", first)
    augment = Augmenter(AugmentOptions(shuffle_window=1))
    seen = set()
    for epoch in range(20):
        out = augment(conv(user=text), seed=8, epoch=epoch, index=0)[1]["content"]
        head, tail = out.split("。", 1)
        assert tail == second or sorted(re.split("[，、；]", tail.rstrip("。"))) == sorted(re.split("[，、；]", second.rstrip("。")))
        assert sorted(out) == sorted(text)  # every character kept, none changed
        parts = re.split("[，、；]", head)
        assert sorted(parts) == sorted(clauses)
        assert [c for c in re.findall("[，、；]", head)] == re.findall("[，、；]", first)  # punctuation stays in place
        assert all(abs(parts.index(c) - clauses.index(c)) <= 1 for c in clauses)
        seen.add(out)
    assert len(seen) > 3


def test_chinese_insertion_adds_a_synonym_next_to_a_matched_word():
    augment = Augmenter(AugmentOptions(insert_prob=1.0))
    out = augment(conv(user="客户非常生气。"), seed=0, epoch=0, index=0)[1]["content"]
    # every matched word is followed by a synonym of one of the matched words
    words = ["客户", "非常", "生气"]
    synonyms = alternation(sorted({s for w in words for s in augment.table.alternatives(w)}))
    assert re.fullmatch(f"客户{synonyms}非常{synonyms}生气{synonyms}。", out), out


# --- template rotation and ratio ------------------------------------------------------
def test_template_rotation_rate_and_language():
    augment = Augmenter(AugmentOptions(template_rotation=0.3))
    samples = [conv(user=EN if i % 2 else ZH) for i in range(2000)]
    rotated = 0
    for i, sample in enumerate(samples):
        out = augment(sample, seed=0, epoch=0, index=i)[1]["content"]
        if out != sample[1]["content"]:
            rotated += 1
            instruction = sample[1]["content"]
            assert instruction in out
            frame = out.replace(instruction, "")
            assert is_chinese(frame) == (instruction == ZH), out
    assert abs(rotated / 2000 - 0.3) <= 0.03


def test_user_templates_and_the_last_user_message():
    options = AugmentOptions(template_rotation=1.0, instruction_templates=["Q: {instruction}", "{instruction} (be brief)"])
    sample = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
              {"role": "user", "content": "second question"}, {"role": "assistant", "content": "second answer"}]
    outs = {Augmenter(options)(sample, seed=0, epoch=e, index=0)[2]["content"] for e in range(20)}
    assert outs == {"Q: second question", "second question (be brief)"}
    assert Augmenter(options)(sample, seed=0, epoch=0, index=0)[0]["content"] == "first question"


def test_ratio_is_the_share_of_augmented_samples():
    assert not AugmentOptions(synonym_prob=1.0, ratio=0.0).enabled()
    assert not AugmentOptions().enabled()
    assert AugmentOptions(back_translate="m:f").enabled()
    never = Augmenter(AugmentOptions(synonym_prob=1.0, ratio=0.0))
    assert all(never(conv(), 0, 0, i) == conv() for i in range(50))
    augment = Augmenter(AugmentOptions(synonym_prob=1.0, ratio=0.4))
    changed = sum(augment(conv(), seed=0, epoch=0, index=i)[1]["content"] != EN for i in range(1000))
    assert abs(changed / 1000 - 0.4) <= 0.05


# --- tables -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["synonyms_en.tsv", "synonyms_zh.tsv"])
def test_bundled_tables_are_well_formed(name):
    text = resources.files("r1tune.resources").joinpath(name).read_text(encoding="utf-8")
    groups = [line.split("\t") for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert 150 <= len(groups) <= 320
    words = [w.lower() for g in groups for w in g]
    assert all(len(g) >= 2 and all(w.strip() == w and w for w in g) for g in groups)
    assert len(words) == len(set(words)), "a word is in two groups"
    if name.endswith("zh.tsv"):
        assert not re.search("[二三四五六七八九十百千万亿两]", text), "numerals in a synonym could change a number"
        assert all(len(w) >= 2 for w in words)


def test_user_table_extends_and_overrides(tmp_path):
    table = tmp_path / "domain.tsv"
    table.write_text("# my table\nquick\tspeedy\nwidget\tgadget\tgizmo\n\n登录\t签到\n", encoding="utf-8")
    augment = Augmenter(AugmentOptions(synonym_prob=1.0, synonyms_file=str(table)))
    assert augment.table.alternatives("quick") == ["speedy"]          # overridden
    assert sorted(augment.table.alternatives("fast")) == ["rapid"]    # the rest of the bundled group stays
    assert augment.table.alternatives("widget") == ["gadget", "gizmo"]  # extended
    assert augment.table.alternatives("huge")                          # bundled groups still there
    out = augment(conv(user="quick widget"), seed=0, epoch=0, index=0)[1]["content"]
    assert re.fullmatch(r"speedy (gadget|gizmo)", out)
    assert augment(conv(user="请登录"), seed=0, epoch=0, index=0)[1]["content"] == "请签到"

    table.write_text("# r1tune: replace-bundled\nwidget\tgadget\n", encoding="utf-8")
    only = Augmenter(AugmentOptions(synonym_prob=1.0, synonyms_file=str(table)))
    assert only.table.alternatives("huge") == [] and only.table.alternatives("widget") == ["gadget"]


# --- back-translation hook ------------------------------------------------------------
def write_module(tmp_path, monkeypatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(body, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_back_translation_hook_is_called_and_used(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "r1tune_test_bt_ok", (
        "CALLS = []\n"
        "def round_trip(text, rng):\n"
        "    CALLS.append((text, type(rng).__name__))\n"
        "    return f'[{rng.randint(0, 999)}] ' + text.replace('explain', 'describe')\n"))
    import r1tune_test_bt_ok as hook

    augment = Augmenter(AugmentOptions(back_translate="r1tune_test_bt_ok:round_trip", augment_targets=True))
    out = augment(conv(), seed=1, epoch=0, index=3)
    assert re.fullmatch(r"\[\d+\] " + re.escape(EN.replace("explain", "describe")), out[1]["content"])
    assert out[2]["content"].startswith(THINK) and re.fullmatch(r"\[\d+\] " + re.escape(ANSWER), out[2]["content"][len(THINK):])
    assert hook.CALLS == [(EN, "Random"), (ANSWER, "Random")]  # the reasoning never reaches the hook
    assert augment(conv(), seed=1, epoch=0, index=3) == out      # seeded rng: reproducible
    assert {augment(conv(), seed=1, epoch=e, index=3)[1]["content"] for e in range(5)} != {out[1]["content"]}


def test_back_translation_that_loses_a_number_is_discarded(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "r1tune_test_bt_lossy", "def f(text, rng):\n    return 'something else'\n")
    augment = Augmenter(AugmentOptions(back_translate="r1tune_test_bt_lossy:f"))
    assert augment(conv(user="Pay 42 dollars."), 0, 0, 0)[1]["content"] == "Pay 42 dollars."
    assert augment.stats["back_translate_rejected"] == 1
    assert augment(conv(user="Pay now."), 0, 0, 0)[1]["content"] == "something else"


def test_back_translation_hook_errors(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "r1tune_test_bt_bad", (
        "NOT_A_FUNCTION = 3\n"
        "def translate(text, rng):\n    raise RuntimeError('model server is down')\n"
        "def returns_none(text, rng):\n    return None\n"))
    cases = {"no_colon_here": "module.path:function", "r1tune_no_such_module_xyz:f": "cannot import",
             "r1tune_test_bt_bad:translat": "did you mean 'translate'", "r1tune_test_bt_bad:NOT_A_FUNCTION": "not a function"}
    for spec, expected in cases.items():
        with pytest.raises(UserError) as err:
            Augmenter(AugmentOptions(back_translate=spec), source="run.yaml")
        message = str(err.value)
        assert message.startswith("run.yaml: augment_back_translate") and expected in message and one_sentence(message), message

    augment = Augmenter(AugmentOptions(back_translate="r1tune_test_bt_bad:translate"), source="run.yaml")
    with pytest.raises(UserError) as err:
        augment(conv(), seed=0, epoch=0, index=17)
    message = str(err.value)
    assert "r1tune_test_bt_bad:translate" in message and "record 17" in message and "model server is down" in message
    assert one_sentence(message)
    with pytest.raises(UserError, match="returned NoneType"):
        Augmenter(AugmentOptions(back_translate="r1tune_test_bt_bad:returns_none"))(conv(), 0, 0, 0)


# --- errors -------------------------------------------------------------------------
def test_missing_and_unreadable_table_files(tmp_path):
    for path, expected in [(tmp_path / "missing.tsv", "does not exist"), (tmp_path, "is not a file")]:
        with pytest.raises(UserError) as err:
            Augmenter(AugmentOptions(synonyms_file=str(path)), source="run.yaml")
        message = str(err.value)
        assert message.startswith("run.yaml: augment_synonyms_file") and expected in message and one_sentence(message)
    binary = tmp_path / "latin1.tsv"
    binary.write_bytes("caf\xe9\tbar\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        Augmenter(AugmentOptions(synonyms_file=str(binary)))


@pytest.mark.parametrize("bad, why", [("lonely", "only one word"), ("快速 迅速", "no tab")])
def test_malformed_table_line_names_the_line(tmp_path, bad, why):
    table = tmp_path / "t.tsv"
    table.write_text(f"# header\nbig\tlarge\n{bad}\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        Augmenter(AugmentOptions(synonyms_file=str(table)), source="run.yaml")
    message = str(err.value)
    assert "augment_synonyms_file" in message and "line 3" in message and why in message and one_sentence(message), message


def test_bad_option_values():
    for options, key in [(AugmentOptions(synonym_prob=1.5), "augment_synonym_prob"),
                         (AugmentOptions(ratio=-0.1), "augment_ratio"),
                         (AugmentOptions(shuffle_window=-1), "augment_shuffle_window"),
                         (AugmentOptions(instruction_templates=["no placeholder"]), "augment_instruction_templates")]:
        with pytest.raises(UserError) as err:
            Augmenter(options, source="run.yaml")
        assert key in str(err.value) and one_sentence(str(err.value))


def test_rng_is_stable_across_processes():
    # the per-text seed must not come from Python's salted hash(): pin one draw
    import subprocess
    import sys

    code = ("from r1tune.data.augment import AugmentOptions, Augmenter; "
            f"print(Augmenter(AugmentOptions(synonym_prob=0.5))([{{'role': 'user', 'content': {EN!r}}}], 1, 2, 3)[0]['content'])")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(s), "PATH": ""}).stdout for s in (1, 2)}
    here = Augmenter(AugmentOptions(synonym_prob=0.5))([{"role": "user", "content": EN}], 1, 2, 3)[0]["content"]
    assert runs == {here + "\n"}


def test_english_shuffle_keeps_the_sentence_capital():
    augment = Augmenter(AugmentOptions(shuffle_window=3))
    text = "Please explain quickly why the company failed. Then suggest what it should change."
    outs = {augment(conv(user=text), seed=0, epoch=e, index=0)[1]["content"] for e in range(20)}
    assert len(outs) > 5
    for out in outs:
        first, second = out.rstrip(".").split(". ")
        assert first[0].isupper() and second[0].isupper() and first[1:].islower() and second[1:].islower(), out


def test_training_examples_are_redrawn_per_epoch_with_targets_untouched(tiny_ds, tmp_path):
    from r1tune.data.prepare import prepare_data
    from r1tune.data.encode import IGNORE
    from r1tune.data.epochs import augmented_epochs
    from r1tune.models.loading import load_tokenizer
    from tests.conftest import make_cfg, write_jsonl

    records = [{"instruction": "Please explain quickly how to fix the big problem with my account, thanks",
                "output": f"Answer {i}: reset the password."} for i in range(12)]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = make_cfg(tiny_ds, data, tmp_path / "out", cutoff_len=128, augment_synonym_prob=0.5, augment_shuffle_window=2)
    tok = load_tokenizer(tiny_ds, False)
    prepared = prepare_data(cfg, tok)
    epochs = augmented_epochs(cfg, tok, prepared.train_samples, prepared.train)
    first, again, second = epochs(0), epochs(0), epochs(1)
    assert [e.input_ids for e in first] == [e.input_ids for e in again]  # seeded
    assert [e.input_ids for e in first] != [e.input_ids for e in second]  # re-drawn each epoch
    assert any(a.input_ids != o.input_ids for a, o in zip(first, prepared.train))
    targets = lambda e: [t for t in e.labels if t != IGNORE]  # noqa: E731
    assert [targets(e) for e in first] == [targets(e) for e in prepared.train]  # answers never touched


def test_augmentation_in_a_run_and_refused_with_packing(tiny_ds, parity_file, tmp_path):
    from r1tune.errors import UserError
    from r1tune.train.stages.sft import run_sft
    from tests.conftest import make_cfg

    run_sft(make_cfg(tiny_ds, parity_file, tmp_path / "out", max_steps=3, augment_synonym_prob=0.3,
                     augment_template_rotation=0.1))
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    with pytest.raises(UserError, match="augmentation re-encodes samples every epoch"):
        make_cfg(tiny_ds, parity_file, tmp_path / "o2", packing=True, augment_synonym_prob=0.3)
