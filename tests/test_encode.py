"""Template parity with tokenizer.apply_chat_template and the per-token label mask."""

import pytest

from r1tune.data.encode import IGNORE, encode_conversation, render_segments
from r1tune.data.reasoning import split_reasoning
from r1tune.data.templates import DEEPSEEK_R1_TEMPLATE, apply_template_choice
from r1tune.errors import UserError

SYSTEM = {"role": "system", "content": "You are a careful assistant."}
Q1 = {"role": "user", "content": "Is 4827 even or odd?"}
A1_THINK = {"role": "assistant", "content": "<think>\nThe last digit is 7.\n</think>\n\nodd"}
A1_PLAIN = {"role": "assistant", "content": "odd"}
Q2 = {"role": "user", "content": "那么 350 呢？"}
A2_THINK = {"role": "assistant", "content": "<think>\n最后一位是0。\n</think>\n\n偶数"}
A2_PLAIN = {"role": "assistant", "content": "偶数"}


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def template(tokenizer, messages, generation=False):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def trained_text(tokenizer, example):
    return tokenizer.decode([t for t, l in zip(example.input_ids, example.labels) if l != IGNORE])


@pytest.mark.parametrize("messages", [
    [Q1, A1_PLAIN],                          # single turn
    [SYSTEM, Q1, A1_PLAIN],                  # system prompt
    [Q1, A1_PLAIN, Q2, A2_PLAIN],            # multi-turn
    [SYSTEM, Q1, A1_THINK, Q2, A2_PLAIN],    # earlier reasoning is dropped by the template
])
def test_plain_answers_match_template_exactly(tokenizer, messages):
    example = encode_conversation(tokenizer, messages, cutoff_len=4096, empty_think="omit")
    assert example.input_ids == ids(tokenizer, template(tokenizer, messages))


@pytest.mark.parametrize("history", [[], [SYSTEM], [SYSTEM, Q1, A1_THINK]])
def test_final_reasoning_is_kept(tokenizer, history):
    messages = history + [Q2, A2_THINK] if history else [Q1, A1_THINK]
    example = encode_conversation(tokenizer, messages, cutoff_len=4096)
    prompt = template(tokenizer, messages[:-1], generation=True)
    reasoning, answer = split_reasoning(messages[-1]["content"])
    expected = prompt + f"{reasoning}\n</think>\n\n{answer}<｜end▁of▁sentence｜>"
    assert prompt.endswith("<｜Assistant｜><think>\n")
    assert example.input_ids == ids(tokenizer, expected)
    # The trained part of the final turn is exactly what the model must generate after the prompt.
    final_trained = trained_text(tokenizer, example).split("<｜end▁of▁sentence｜>")[-2]
    assert final_trained.endswith(f"{reasoning}\n</think>\n\n{answer}")


def test_label_mask_token_by_token(tokenizer):
    messages = [SYSTEM, Q1, A1_THINK, Q2, A2_THINK]
    example = encode_conversation(tokenizer, messages, cutoff_len=4096)
    segments = render_segments(tokenizer, messages)
    position = 0
    for text, trained in segments:
        n = len(ids(tokenizer, text))
        labels = example.labels[position:position + n]
        want = example.input_ids[position:position + n] if trained else [IGNORE] * n
        assert labels == want, f"segment {text!r} trained={trained}"
        position += n
    assert position == len(example.input_ids)
    # Prompt-side tokens are never trained: system, user text, role markers and the opened <think>.
    assert [s for s, t in segments if not t][-1].endswith("<｜Assistant｜><think>\n")
    assert [s for s, t in segments if t] == ["\n\nodd<｜end▁of▁sentence｜>", "最后一位是0。\n</think>\n\n偶数<｜end▁of▁sentence｜>"]


def test_empty_think_modes(tokenizer):
    msgs = [Q1, A1_PLAIN]
    mask = render_segments(tokenizer, msgs, "mask")
    train = render_segments(tokenizer, msgs, "train")
    omit = render_segments(tokenizer, msgs, "omit")
    assert mask[-2][0].endswith("<think>\n\n</think>\n\n") and mask[-1] == ("odd<｜end▁of▁sentence｜>", True)
    assert train[-1] == ("\n</think>\n\nodd<｜end▁of▁sentence｜>", True)
    assert omit[-2][0].endswith("<｜Assistant｜>") and omit[-1] == ("odd<｜end▁of▁sentence｜>", True)


def test_no_duplicate_bos(tokenizer):
    example = encode_conversation(tokenizer, [Q1, A1_PLAIN], cutoff_len=4096)
    assert example.input_ids.count(tokenizer.bos_token_id) == 1


def test_truncation_keeps_labels_or_reports_none(tokenizer):
    messages = [{"role": "user", "content": "word " * 200}, A1_PLAIN]
    example = encode_conversation(tokenizer, messages, cutoff_len=32)
    assert example.truncated and len(example.input_ids) == 32 and example.num_targets == 0
    short = encode_conversation(tokenizer, [Q1, A1_THINK], cutoff_len=22)
    assert short.truncated and short.num_targets > 0


def test_tiny_tokenizer_carries_r1_template_and_tokens(tokenizer):
    assert tokenizer.chat_template == DEEPSEEK_R1_TEMPLATE
    for token in ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]:
        assert len(ids(tokenizer, token)) == 1, token
    assert tokenizer.decode(ids(tokenizer, "<think>\nx\n</think>"), skip_special_tokens=True) == "<think>\nx\n</think>"


def test_system_messages_join_and_hoist(tokenizer):
    text = template(tokenizer, [SYSTEM, Q1, A1_PLAIN, {"role": "system", "content": "Be brief."}, Q2], True)
    assert text.startswith("<｜begin▁of▁sentence｜>You are a careful assistant.\n\nBe brief.<｜User｜>")


def test_unknown_template_is_user_error(tokenizer):
    with pytest.raises(UserError, match="unknown template 'deepsek_r1' — did you mean 'deepseek_r1'"):
        apply_template_choice(tokenizer, "deepsek_r1", "run.yaml")


def test_earlier_turn_target_starts_right_after_the_role_marker(tokenizer):
    table = {"role": "assistant", "content": "<table>odd</table>"}
    segments = render_segments(tokenizer, [Q1, table, Q2, A2_PLAIN])
    assert segments[0][0].endswith("<｜Assistant｜>") and segments[1] == ("<table>odd</table><｜end▁of▁sentence｜>", True)


def test_generation_prompt_matches_training_prompt(tokenizer):
    from r1tune.data.encode import generation_prompt

    for mode in ("mask", "train", "omit"):
        segments = render_segments(tokenizer, [Q1, A1_PLAIN], mode)
        assert generation_prompt(tokenizer, [Q1, A1_PLAIN], mode) == segments[0][0]
    assert generation_prompt(tokenizer, [Q1, A1_THINK]).endswith("<｜Assistant｜><think>\n")


def test_nothink_template_trains_the_answer_without_reasoning(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    apply_template_choice(tok, "deepseek_r1_nothink")
    conv = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA"}]
    segments = render_segments(tok, conv)
    text = "".join(t for t, _ in segments)
    assert text.count("<think>") == 1 and "hmm" not in text
    assert [t for t, trained in segments if trained] == ["A<｜end▁of▁sentence｜>"]


def test_boundary_labelling_equals_labelling_by_every_offset(tokenizer):
    """The batch path asks the tokenizer only for span-boundary tokens; it must match labelling by all offsets."""
    import random

    from r1tune.data.encode import _label, encode_segments_batch

    rng = random.Random(0)
    pieces = ["abc", " de", "你好", "12345", "\n\n", "<｜User｜>", "<think>", " ", "x", "é", "🙂"]
    batch = [[("".join(rng.choice(pieces) for _ in range(rng.randint(0, 6))), i % 2 == 1) for i in range(rng.randint(1, 6))]
             for _ in range(500)]
    fast = encode_segments_batch(tokenizer, batch)
    for example, segments in zip(fast, batch):
        enc = tokenizer("".join(t for t, _ in segments), add_special_tokens=False, return_offsets_mapping=True)
        slow = _label(enc["input_ids"], [s for s, _ in enc["offset_mapping"]], segments)
        assert (example.input_ids, example.labels) == (slow.input_ids, slow.labels)
