"""The OpenAI-compatible server: a live uvicorn server on a free port, driven by the openai client."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch

from r1tune.serve.app import create_app
from r1tune.serve.handler import ServeLimits
from r1tune.serve.models import single
from r1tune.data.reasoning import StreamSplitter
from r1tune.data.reasoning import split_output
from r1tune.serve.stops import StopScanner, cut_at_stop

KEY = "test-key"
NAME = "tiny-r1"
MSGS = [{"role": "user", "content": "What is 2+2?"}]


# ---------------------------------------------------------------- pure functions


@pytest.mark.parametrize("text, opened, expected", [
    ("I think.\n</think>\n\nFour.", True, ("I think.", "Four.")),
    ("still thinking", True, ("still thinking", "")),
    ("plain answer ", False, (None, "plain answer")),
    ("\n<think>\nhm\n</think>\n\n4", False, ("hm", "4")),
    ("a</think>b</think>c", True, ("a", "b</think>c")),
])
def test_split_output(text, opened, expected):
    assert split_output(text, opened) == expected


def assemble(pieces, opened):
    splitter, parts = StreamSplitter(opened), {"reasoning_content": "", "content": ""}
    for piece in pieces:
        for field, text in splitter.feed(piece):
            parts[field] += text
    for field, text in splitter.finish():
        parts[field] += text
    return parts


@pytest.mark.parametrize("text, opened", [
    ("I think.\n</think>\n\nFour.", True), ("still thinking", True), ("plain answer", False),
    ("\n<think>\nhm\n</think>\n\n4", False), ("<thi", False), ("x</think>", True),
])
def test_stream_splitter_matches_split(text, opened):
    reasoning, answer = split_output(text, opened)
    for size in (1, 2, 3, 100):  # the tags arrive cut at every place
        parts = assemble([text[i:i + size] for i in range(0, len(text), size)], opened)
        assert parts["reasoning_content"].strip() == (reasoning or "")
        assert parts["content"].strip() == answer


def test_stop_scanner_matches_cut():
    text, stops = "abc STOP def", ["STOP", "zz"]
    assert cut_at_stop(text, stops) == ("abc ", True)
    assert cut_at_stop(text, ["nope"]) == (text, False)
    scanner, out = StopScanner(stops), ""
    for ch in text:
        piece, hit = scanner.feed(ch)
        out += piece
        if hit:
            break
    assert (out, hit) == ("abc ", True)


# ---------------------------------------------------------------- live server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def loaded(tiny_ds):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_ds, dtype=torch.float32), AutoTokenizer.from_pretrained(tiny_ds)


def serve(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def live(loaded):
    model, tokenizer = loaded
    limits = ServeLimits(max_body_bytes=20_000, max_prompt_tokens=200, max_tokens=16)
    app = create_app(single(model, tokenizer, NAME), api_key=KEY, limits=limits)
    server, thread, url = serve(app)
    yield url, app
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def base_url(live):
    return live[0]


@pytest.fixture()
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=60)


def extra(message, name):
    return getattr(message, name, None) if hasattr(message, name) else (message.model_extra or {}).get(name)


def test_chat_non_stream(client, loaded):
    _, tokenizer = loaded
    r = client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=8, temperature=0)
    choice = r.choices[0]
    prompt = tokenizer.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.finish_reason == ("stop" if r.usage.completion_tokens < 8 else "length")
    assert isinstance(choice.message.content, str)
    assert isinstance(extra(choice.message, "reasoning_content"), str)  # the R1 prompt opens <think>
    assert r.model == NAME and r.object == "chat.completion"


def test_chat_stream_matches_non_stream(client):
    full = client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=8)
    parts, finish = {"reasoning_content": "", "content": ""}, None
    for chunk in client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=8, stream=True):
        assert chunk.object == "chat.completion.chunk"
        delta = chunk.choices[0].delta
        parts["content"] += delta.content or ""
        parts["reasoning_content"] += extra(delta, "reasoning_content") or ""
        finish = chunk.choices[0].finish_reason or finish
    message = full.choices[0].message
    assert parts["content"].strip() == message.content
    assert parts["reasoning_content"].strip() == extra(message, "reasoning_content")
    assert finish == full.choices[0].finish_reason


def test_stream_usage_and_raw_sse(base_url):
    body = {"model": NAME, "messages": MSGS, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == ""
    assert '"usage"' in events[-3]


def test_sampled_with_seed(client):
    kw = dict(model=NAME, messages=MSGS, max_tokens=6, temperature=0.9, top_p=0.9, seed=3)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert a.choices[0].message == b.choices[0].message


def test_models_and_completions(client):
    assert [m.id for m in client.models.list().data] == [NAME]
    r = client.completions.create(model=NAME, prompt="Hello there", max_tokens=5)
    assert isinstance(r.choices[0].text, str) and r.usage.completion_tokens <= 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="Hello there", max_tokens=5, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_stop_string(client):
    text = client.completions.create(model=NAME, prompt="Hello there", max_tokens=8).choices[0].text
    if len(text) < 3:
        pytest.skip("too little text to cut")
    stop = text[1:3]
    r = client.completions.create(model=NAME, prompt="Hello there", max_tokens=8, stop=[stop])
    assert r.choices[0].text == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"


def test_predict_and_health(base_url):
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}  # open without a key
    r = httpx.post(f"{base_url}/predict", json={"text": "hi", "max_tokens": 4},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200 and set(r.json()) == {"text", "reasoning"}


def test_auth(base_url, client):
    bad = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(f"{base_url}/predict", json={"text": "hi"})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert client.models.list().data  # the right key works


def post(base_url, body, **kw):
    return httpx.post(f"{base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60, **({"json": body} if body is not None else kw))


def test_request_errors(base_url, client):
    big = post(base_url, None, content=b"x" * 30_000, )
    assert big.status_code == 413 and "max_body_bytes" in big.json()["error"]["message"]
    long = post(base_url, {"model": NAME, "messages": [{"role": "user", "content": "word " * 1000}]})
    assert long.status_code == 400 and "max_prompt_tokens=200" in long.json()["error"]["message"]
    too_many = post(base_url, {"model": NAME, "messages": MSGS, "max_tokens": 17})
    assert too_many.status_code == 400 and "max_tokens=16" in too_many.json()["error"]["message"]
    invalid = post(base_url, {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]})
    assert invalid.status_code == 422 and "messages.0.role" in invalid.json()["error"]["message"]
    assert post(base_url, {"model": NAME, "messages": []}).status_code == 422
    assert post(base_url, {"model": NAME, "messages": MSGS, "temperature": 5}).status_code == 422
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="/etc/passwd", messages=MSGS, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=100)


def test_metrics_count_requests(base_url):
    auth = {"Authorization": f"Bearer {KEY}"}
    httpx.get(f"{base_url}/health")
    text = httpx.get(f"{base_url}/metrics", headers=auth).text
    assert 'r1tune_requests_total{endpoint="/health",status="200"}' in text
    assert "r1tune_request_seconds_bucket" in text and "r1tune_generated_tokens_total" in text


def test_apps_do_not_share_metrics(loaded):
    model, tokenizer = loaded
    a, b = create_app(single(model, tokenizer, "a")), create_app(single(model, tokenizer, "b"))
    assert a.state.metrics.registry is not b.state.metrics.registry


def test_concurrent_requests_share_decoding_steps(client, live):
    """Greedy replies are the same alone or batched, and batched requests share forward passes."""
    alone = client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=12, temperature=0)
    engine, results = live[1].state.handler.engine, []
    before = engine.steps

    def ask():
        results.append(client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=12, temperature=0))
    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and all(r.choices[0].message == alone.choices[0].message for r in results)
    tokens = sum(r.usage.completion_tokens for r in results)
    assert engine.steps - before < tokens * 0.75  # one at a time would take a step per token


# ---------------------------------------------------------------- the split end to end, with a scripted model


class ScriptedModel(torch.nn.Module):
    """Stands in for a model: its logits pick a fixed reply (then EOS), one token per step."""

    def __init__(self, tokenizer, reply: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.reply = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        self.vocab, self.start = len(tokenizer), None

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None, logits_to_keep=0):
        seen = position_ids[:, -1] + 1  # real tokens read so far, per row
        if input_ids.shape[1] > 1:  # the prompt: the reply starts after it
            self.start = seen
        step = (seen - self.start).clamp(max=len(self.reply) - 1)
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[torch.arange(input_ids.shape[0]), 0, torch.tensor(self.reply)[step]] = 1.0
        return SimpleNamespace(logits=logits)


@pytest.fixture()
def scripted(loaded):
    from fastapi.testclient import TestClient

    tokenizer = loaded[1]
    return TestClient(create_app(single(ScriptedModel(tokenizer, "Add them.\n</think>\n\nThe answer is 4."), tokenizer, NAME)))


def test_reasoning_split_end_to_end(scripted):
    body = {"model": NAME, "messages": MSGS, "max_tokens": 50}
    r = scripted.post("/v1/chat/completions", json=body).json()
    message = r["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("Add them.", "The answer is 4.")
    assert r["choices"][0]["finish_reason"] == "stop"
    stream = scripted.post("/v1/chat/completions", json={**body, "stream": True}).text
    import json

    deltas = [json.loads(e[6:])["choices"][0]["delta"] for e in stream.split("\n\n") if e.startswith("data: {")]
    assert "".join(d.get("reasoning_content", "") for d in deltas).strip() == "Add them."
    assert "".join(d.get("content", "") for d in deltas) == "The answer is 4."
    predicted = scripted.post("/predict", json={"text": "2+2?"}).json()
    assert predicted == {"text": "The answer is 4.", "reasoning": "Add them."}


def test_stop_string_in_stream(scripted):
    body = {"model": NAME, "messages": MSGS, "max_tokens": 50, "stop": ["is 4"], "stream": True}
    stream = scripted.post("/v1/chat/completions", json=body).text
    assert "is 4" not in stream and '"finish_reason": "stop"' in stream
    full = scripted.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert full["choices"][0]["message"]["content"] == "The answer"


@pytest.mark.parametrize("pieces, opened, shown", [
    (["The last ", "digit is 7.\n</th", "ink>", "\n\n", "odd"], True, "[reasoning]\nThe last digit is 7.\n\n[answer]\nodd\n"),
    (["<thi", "nk>\nhm\n</think>\n\n4"], False, "[reasoning]\nhm\n\n[answer]\n4\n"),  # the model opens it itself
    (["plain ", "answer"], False, "plain answer\n"),
])
def test_chat_printer_shows_the_parts_serve_returns(pieces, opened, shown):
    import io

    from r1tune.serve.chat import ReasoningPrinter

    out = io.StringIO()
    printer = ReasoningPrinter(out, reasoning_open=opened)
    for piece in pieces:
        printer.feed(piece)
    printer.finish()
    assert out.getvalue() == shown
