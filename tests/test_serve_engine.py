"""The batching engine: batched decoding equals transformers' generate, rows join and leave,
seeded sampling does not depend on the batch, adapters never share a batch, failures stay local."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from r1tune.models.decode import eos_ids_of
from r1tune.serve.engine import Engine, QueueFull
from r1tune.models.sampling import Params, nucleus
from r1tune.serve.ticket import IncrementalDecoder, Ticket

PROMPTS = ["What is 2+2?", "Tell me a story about a dragon and a knight in a castle far away", "hi",
           "是的，我们明天见面吧", "Is 4827 even or odd?"]


@pytest.fixture(scope="module", params=["ds", "qwen"])
def loaded(request, tiny_ds, tiny_qwen):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1tune.models.attention import use_cpu_attention

    path = tiny_ds if request.param == "ds" else tiny_qwen
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    use_cpu_attention(model)  # as r1tune loads it
    return model, AutoTokenizer.from_pretrained(path)


def prompt_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def collect(ticket: Ticket) -> tuple[list[int], str]:
    tokens = []
    while True:
        event = ticket.events.get(timeout=60)
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, int):
            tokens.append(event)
        else:
            return tokens, event.reason


def run_staggered(engine, tickets, gap_s=0.02):
    """Submit the tickets `gap_s` apart from threads; their (tokens, finish reason) in order."""
    results = [None] * len(tickets)

    def one(i):
        time.sleep(gap_s * i)
        results[i] = collect(engine.submit(tickets[i]))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(tickets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_batched_greedy_equals_generate(loaded):
    model, tokenizer = loaded
    eos, ids = eos_ids_of(model, tokenizer), [prompt_ids(tokenizer, p) for p in PROMPTS]
    expected = []
    for row in ids:
        out = model.generate(torch.tensor([row]), max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected.append(out[0, len(row):].tolist())
    engine = Engine(model, tokenizer.pad_token_id, max_batch=3, wait_s=0.01)
    try:
        results = run_staggered(engine, [Ticket(row, Params(10), None, eos) for row in ids])
    finally:
        engine.close()
    assert [tokens for tokens, _ in results] == expected
    assert engine.steps < sum(len(e) - 1 for e in expected)  # rows joined running batches


def test_rows_leave_when_done_and_cancel_stops_a_row(loaded):
    model, tokenizer = loaded
    ids, eos = prompt_ids(tokenizer, "hi"), set()  # no EOS: only the limits end a row
    engine = Engine(model, tokenizer.pad_token_id, max_batch=4, wait_s=0.05)
    try:
        short, long = Ticket(ids, Params(2), None, eos), Ticket(ids, Params(9), None, eos)
        results = run_staggered(engine, [short, long], gap_s=0)
        assert [len(t) for t, _ in results] == [2, 9] and results[0][1] == "length"
        steps = engine.steps
        cancelled = Ticket(ids, Params(500), None, eos)
        engine.submit(cancelled)
        cancelled.events.get(timeout=30)
        cancelled.cancel()
        tokens, reason = collect(cancelled)
        assert reason == "stop" and len(tokens) < 10 and engine.steps - steps < 10
    finally:
        engine.close()


def test_seeded_sampling_does_not_depend_on_the_batch(loaded):
    model, tokenizer = loaded
    ids, eos = [prompt_ids(tokenizer, p) for p in PROMPTS[:3]], set()
    sampled = lambda row: Ticket(row, Params(8, temperature=0.9, top_p=0.9, seed=5), None, eos)  # noqa: E731
    engine = Engine(model, tokenizer.pad_token_id, max_batch=4, wait_s=0.05)
    try:
        alone = collect(engine.submit(sampled(ids[0])))[0]
        together = run_staggered(engine, [sampled(ids[0]), sampled(ids[1]), sampled(ids[2])], gap_s=0)
        other_seed = collect(engine.submit(Ticket(ids[0], Params(8, 0.9, 0.9, seed=6), None, eos)))[0]
    finally:
        engine.close()
    assert together[0][0] == alone and other_seed != alone


def test_adapters_never_share_a_batch(loaded):
    model, tokenizer = loaded
    active, seen = {"name": None}, []
    original = model.forward

    def forward(*args, **kwargs):
        seen.append((active["name"], kwargs["input_ids"].shape[0]))
        return original(*args, **kwargs)
    model.forward = forward
    engine = Engine(model, tokenizer.pad_token_id, activate=lambda a: active.update(name=a), max_batch=8, wait_s=0.05)
    try:
        ids = prompt_ids(tokenizer, "hi")
        tickets = [Ticket(ids, Params(4), adapter, set()) for adapter in ["a", "a", "b", "a", "b"]]
        for t in tickets:
            engine.submit(t)
        results = [collect(t) for t in tickets]
    finally:
        engine.close()
        del model.forward
    assert all(len(tokens) == 4 for tokens, _ in results)
    # first batch: the two leading "a" requests; "b" waits its turn, then the later "a" follows it
    names = [name for name, _ in seen]
    assert names[0] == "a" and set(names) == {"a", "b"}
    switches = sum(1 for x, y in zip(names, names[1:]) if x != y)
    assert switches <= 3 and seen[0][1] == 2


def test_full_queue_and_a_failing_forward(loaded):
    model, tokenizer = loaded
    ids = prompt_ids(tokenizer, "hi")
    engine = Engine(model, tokenizer.pad_token_id, max_batch=1, wait_s=0, max_queue=1)
    original, calls = model.forward, {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return original(*args, **kwargs)
    model.forward = forward
    try:
        first = engine.submit(Ticket(ids, Params(3), None, set()))
        with pytest.raises(RuntimeError, match="boom"):
            collect(first)
        second = engine.submit(Ticket(ids, Params(3), None, set()))
        assert len(collect(second)[0]) == 3  # the engine survived
        engine.submit(Ticket(ids, Params(400), None, set()))
        deadline = time.time() + 10
        with pytest.raises(QueueFull):
            while time.time() < deadline:  # one decoding, one waiting: the next is refused
                engine.submit(Ticket(ids, Params(400), None, set()))
    finally:
        engine.close()
        del model.forward


def test_incremental_decoder_matches_full_decode(tokenizer):
    text = "Hello wörld! 你好，世界。<think>\nhm</think> 😀 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder, pieces = IncrementalDecoder(tokenizer, [0, 1, 2]), []
    for token in ids:
        piece = decoder.add(token)
        assert "\ufffd" not in piece
        pieces.append(piece)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_nucleus_keeps_the_smallest_set():
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert (nucleus(probs, 0.7) > 0).tolist() == [False, True, True, False]
    assert (nucleus(probs, 0.4) > 0).tolist() == [False, True, False, False]
    assert nucleus(probs, 1.0) is probs


def test_incremental_decoder_flushes_a_character_cut_by_the_last_token(tokenizer):
    """Generation can stop inside a multi-byte character: the held-back bytes come out at the end as U+FFFD,
    as a full decode gives them, so served text equals decode() of the same tokens."""
    ids = tokenizer("你好世界😀", add_special_tokens=False)["input_ids"]
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    decoder = IncrementalDecoder(tokenizer, [0, 1, 2])
    pieces = [decoder.add(token) for token in ids[:cut]] + [decoder.flush()]
    assert "".join(pieces) == tokenizer.decode(ids[:cut], skip_special_tokens=True)
    assert pieces[-1].endswith("\ufffd") and decoder.flush() == ""
