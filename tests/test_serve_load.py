"""200 requests from 32 concurrent clients against a live server: none fails, and they were batched."""

from __future__ import annotations

import asyncio

import httpx
import torch

from r1tune.serve.app import create_app
from r1tune.serve.handler import BatchOptions
from r1tune.serve.models import single
from tests.test_serve import serve

REQUESTS, CLIENTS = 200, 32


def body(i: int) -> tuple[str, dict]:
    """Chat and completions, streamed and not, with varied lengths and settings."""
    common = {"model": "tiny", "max_tokens": 4 + i % 9, "stream": i % 3 == 0}
    if i % 4 == 3:
        return "/v1/completions", {**common, "prompt": f"Count to {i}:"}
    sampled = {"temperature": 0.8, "seed": i} if i % 5 == 0 else {}
    return "/v1/chat/completions", {**common, **sampled, "messages": [{"role": "user", "content": f"Is {i} even?"}]}


async def load(url: str) -> list[int]:
    limit = asyncio.Semaphore(CLIENTS)

    async def one(client, i):
        path, payload = body(i)
        async with limit:
            r = await client.post(url + path, json=payload)
            assert r.text.endswith("data: [DONE]\n\n") if payload["stream"] else "choices" in r.json()
            return r.status_code
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=CLIENTS)) as client:
        return await asyncio.gather(*(one(client, i) for i in range(REQUESTS)))


def test_200_concurrent_requests_no_errors(tiny_ds):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_ds, dtype=torch.float32)
    app = create_app(single(model, AutoTokenizer.from_pretrained(tiny_ds), "tiny"), options=BatchOptions(max_batch=16))
    server, thread, url = serve(app)
    try:
        statuses = asyncio.run(load(url))
        metrics = httpx.get(url + "/metrics").text
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert statuses == [200] * REQUESTS
    batch_sum = float(metrics.split("r1tune_batch_size_sum ")[1].split()[0])
    batch_count = float(metrics.split("r1tune_batch_size_count ")[1].split()[0])
    assert batch_sum / batch_count > 4  # mean rows per decoding step: requests really shared the model
