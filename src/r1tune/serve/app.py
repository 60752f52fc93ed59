"""OpenAI-compatible HTTP server (`create_app(served, ...)`): the routes and their response shapes.

Endpoints: POST /v1/chat/completions (stream or not), POST /v1/completions, GET /v1/models,
POST /predict ({"text"} -> {"text": answer, "reasoning"}), GET /health, GET /metrics (Prometheus).

R1 output is split as DeepSeek's own API does (data/reasoning.py). Full responses strip each
part; streamed deltas drop the leading newlines of each part but may carry the blank line
before `</think>`.

Safety: an optional API key (`Authorization: Bearer KEY`; /health stays open), pydantic request
validation (422), a body-size limit (413), prompt-length and max_tokens limits (400), a full
queue (429), and an unknown model name is a 404. No request field names a file: `model` is only
looked up among the names the server was started with.

Concurrent requests are batched by serve/engine.py: they join a running batch between decoding
steps and leave it when they finish.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from r1tune.serve.handler import BatchOptions, Handler, ServeLimits, stops_of
from r1tune.serve.middleware import Guard, Metrics, MetricsMiddleware
from r1tune.serve.models import ServedSet
from r1tune.serve.protocol import (ChatRequest, CompletionRequest, Message, PredictRequest, error_response,
                                   validation_message)
from r1tune.data.reasoning import StreamSplitter, split_output
from r1tune.serve.ticket import Generated


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(g: Generated) -> dict:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens}


def chat_message(g: Generated, opened: bool) -> dict:
    reasoning, answer = split_output(g.text, opened)
    message = {"role": "assistant", "content": answer}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def chat_chunks(pieces, name: str, opened: bool, include_usage: bool):
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": name}

    def chunk(delta: dict, finish=None) -> str:
        return sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    yield chunk({"role": "assistant", "content": ""})
    splitter, final = StreamSplitter(opened), None
    for item in pieces:
        if isinstance(item, Generated):
            final = item
            break
        for field, text in splitter.feed(item):
            yield chunk({field: text})
    for field, text in splitter.finish():
        yield chunk({field: text})
    yield chunk({}, final.finish_reason)
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(final)})
    yield "data: [DONE]\n\n"


def completion_chunks(pieces, name: str, include_usage: bool):
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": name}
    for item in pieces:
        text, finish = ("", item.finish_reason) if isinstance(item, Generated) else (item, None)
        yield sse({**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})
        if finish and include_usage:
            yield sse({**base, "choices": [], "usage": usage(item)})
    yield "data: [DONE]\n\n"


def event_stream(chunks) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def wants_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def create_app(served: ServedSet, api_key: str | None = None, limits: ServeLimits = ServeLimits(),
               options: BatchOptions = BatchOptions()) -> FastAPI:
    """The FastAPI app serving `served`; its metrics live in the app's own CollectorRegistry."""
    metrics = Metrics()
    handler = Handler(served, limits, metrics, options)

    @asynccontextmanager
    async def lifespan(app):
        import anyio.to_thread

        # each waiting request holds a worker thread: let the queue limit, not the pool, decide
        anyio.to_thread.current_default_thread_limiter().total_tokens = options.max_queue + options.max_batch + 8
        yield
        handler.close()

    app = FastAPI(title="r1tune", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.handler, app.state.metrics = handler, metrics
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts 401/413 too

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = {404: "model_not_found", 413: "request_too_large", 429: "server_busy"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error_response(422, validation_message(exc))

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "r1tune"}
                                           for name in handler.entries]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        entry = handler.entry(req.model)
        max_tokens = handler.max_tokens(req.max_completion_tokens or req.max_tokens)
        stops = stops_of(req)
        ids, opened = handler.chat_prompt(entry, req.messages)
        pieces = handler.generate(entry, ids, max_tokens, req, stops)
        if req.stream:
            return event_stream(chat_chunks(pieces, entry.name, opened, wants_usage(req)))
        *_, g = pieces
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": entry.name, "usage": usage(g),
                "choices": [{"index": 0, "message": chat_message(g, opened), "finish_reason": g.finish_reason,
                             "logprobs": None}]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        entry = handler.entry(req.model)
        max_tokens = handler.max_tokens(req.max_completion_tokens or req.max_tokens)
        stops = stops_of(req)
        ids = handler.encode(entry, req.prompt, special=True)  # raw text: the tokenizer adds BOS
        pieces = handler.generate(entry, ids, max_tokens, req, stops)
        if req.stream:
            return event_stream(completion_chunks(pieces, entry.name, wants_usage(req)))
        *_, g = pieces
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": entry.name, "usage": usage(g),
                "choices": [{"index": 0, "text": g.text, "finish_reason": g.finish_reason, "logprobs": None}]}

    @app.post("/predict")
    def predict(req: PredictRequest):
        entry = handler.entry(req.model) if req.model else handler.default
        ids, opened = handler.chat_prompt(entry, [Message(role="user", content=req.text)])
        *_, g = handler.generate(entry, ids, handler.max_tokens(req.max_tokens), None, [])
        reasoning, answer = split_output(g.text, opened)
        return {"text": answer, "reasoning": reasoning}

    return app
