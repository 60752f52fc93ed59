"""OpenAI-compatible HTTP server for a loaded model (`create_app(model, tokenizer, model_name)`).

Endpoints: POST /v1/chat/completions (stream or not), POST /v1/completions, GET /v1/models,
POST /predict ({"text"} -> {"text": answer, "reasoning"}), GET /health, GET /metrics (Prometheus).

R1 output is split as DeepSeek's own API does: `reasoning_content` is the text before `</think>`
(the R1 template opens `<think>\\n` in the prompt), `content` the answer after it. Both are
stripped of surrounding whitespace in full responses; streamed deltas drop the leading newlines
of each part but may carry the blank line before `</think>`.

Safety: an optional API key (`Authorization: Bearer KEY`; /health stays open), pydantic request
validation (422), a body-size limit (413), prompt-length and max_tokens limits (400), and an
unknown model name is a 404. No request field names a file: `model` is only compared with
`model_name`, never loaded.

Generation is serialized with one lock: one request generates at a time, others wait. Dynamic
batching of concurrent requests is not implemented yet (it is planned).
"""

from __future__ import annotations

import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Literal

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from r1tune.data.templates import THINK_CLOSE, THINK_OPEN

OPEN_PATHS = {"/health"}
KNOWN_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/predict", "/health", "/metrics"}


@dataclass
class ServeLimits:
    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int = 4096
    max_tokens: int = 2048


# ---------------------------------------------------------------- reasoning split


def split_reasoning_output(text: str, opened: bool) -> tuple[str | None, str]:
    """(reasoning or None, answer) of generated text. `opened`: the prompt ended with `<think>`;
    otherwise the output may open the block itself. An unclosed block is all reasoning."""
    if not opened:
        if not text.lstrip().startswith(THINK_OPEN):
            return None, text.strip()
        text = text.lstrip()[len(THINK_OPEN):]
    reasoning, closed, answer = text.partition(THINK_CLOSE)
    return reasoning.strip(), answer.strip() if closed else ""


class StreamSplitter:
    """Routes streamed text to ("reasoning_content" | "content", text) pieces, holding back
    a possible partial tag; gives the same parts as `split_reasoning_output` up to whitespace."""

    def __init__(self, opened: bool):
        self.mode = "reasoning_content" if opened else "start"
        self.buffer, self.part_started = "", False

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buffer += text
        if self.mode == "start":
            head = self.buffer.lstrip()
            if len(head) < len(THINK_OPEN) and THINK_OPEN.startswith(head):
                return []  # can't tell yet whether the output opens a reasoning block
            if head.startswith(THINK_OPEN):
                self.mode, self.buffer = "reasoning_content", head[len(THINK_OPEN):]
            else:
                self.mode = "content"
        if self.mode == "content":
            out, self.buffer = self.buffer, ""
            return self._emit(out)
        if THINK_CLOSE in self.buffer:
            thought, _, rest = self.buffer.partition(THINK_CLOSE)
            pieces = self._emit(thought)
            self.mode, self.buffer, self.part_started = "content", "", False
            return pieces + self._emit(rest)
        keep = len(THINK_CLOSE) - 1
        out, self.buffer = self.buffer[:-keep], self.buffer[-keep:]
        return self._emit(out)

    def finish(self) -> list[tuple[str, str]]:
        out, self.buffer = self.buffer, ""
        if self.mode == "start":
            self.mode = "content"
        return self._emit(out)

    def _emit(self, text: str) -> list[tuple[str, str]]:
        if not self.part_started:
            text = text.lstrip()
            self.part_started = bool(text)
        return [(self.mode, text)] if text else []


# ---------------------------------------------------------------- stop strings


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string (excluded), and whether one was found."""
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[:min(hits)], True) if hits else (text, False)


class StopScanner:
    """Streaming `cut_at_stop`: feed pieces, get the text safe to emit and whether a stop was hit."""

    def __init__(self, stops: list[str]):
        self.stops, self.buffer = [s for s in stops if s], ""
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, piece: str) -> tuple[str, bool]:
        self.buffer += piece
        text, hit = cut_at_stop(self.buffer, self.stops)
        if hit:
            self.buffer = ""
            return text, True
        split = max(len(self.buffer) - self.hold, 0)
        out, self.buffer = self.buffer[:split], self.buffer[split:]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


# ---------------------------------------------------------------- request models


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice is supported")


class ChatRequest(Sampling):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(Sampling):
    model: str
    prompt: str
    stream: bool = False
    stream_options: StreamOptions | None = None


class PredictRequest(BaseModel):
    text: str
    max_tokens: int | None = Field(None, ge=1)


# ---------------------------------------------------------------- errors


ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large"}


def error_body(status: int, message: str, code: str | None = None) -> dict:
    """OpenAI's error shape, which its clients turn into typed exceptions."""
    kind = ERROR_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code), status_code=status)


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())[1:]) or "body"
        parts.append(f"{loc}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


# ---------------------------------------------------------------- ASGI middleware


async def send_error(send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(status, message, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """API key check (all paths but /health) and body-size limit (413), before any parsing."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.limit = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            return await send_error(send, 401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                                    "invalid_api_key")
        too_large = f"request body is larger than max_body_bytes={self.limit}"
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit():
            return await send_error(send, 400, "invalid Content-Length header", "invalid_request")
        if int(declared) > self.limit:
            return await send_error(send, 413, too_large, "request_too_large")
        body = await self._read_body(receive)
        if body is None:
            return await send_error(send, 413, too_large, "request_too_large")
        await self.app(scope, replay(body, receive), send)

    def _authorized(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def _read_body(self, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)


def replay(body: bytes, receive):
    sent = False

    async def wrapped():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return wrapped


class MetricsMiddleware:
    """Request counts by endpoint and status, and latency (to the end of the response body)."""

    def __init__(self, app, metrics: "Metrics"):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        status, start = 500, time.perf_counter()

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("r1tune_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("r1tune_request_seconds", "Request latency", ["endpoint"], registry=self.registry)
        self.tokens = Counter("r1tune_generated_tokens", "Generated tokens", registry=self.registry)


# ---------------------------------------------------------------- generation


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class EventStop:
    """A stopping criterion that ends generation once `event` is set (stop string, disconnect)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Generator:
    """Runs model.generate one request at a time (a lock; no batching yet)."""

    def __init__(self, model, tokenizer, metrics: Metrics):
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.lock = threading.Lock()
        self.device = next(model.parameters()).device
        model.eval()

    def kwargs(self, ids: list[int], max_tokens: int, sampling: dict) -> dict:
        input_ids = torch.tensor([ids], device=self.device)
        return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
                    pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id, **sampling)

    def finish(self, new: list[int], max_tokens: int, stopped: bool) -> str:
        ended = new and new[-1] == self.tokenizer.eos_token_id
        return "stop" if stopped or ended or len(new) < max_tokens else "length"

    @torch.no_grad()
    def run(self, ids: list[int], max_tokens: int, sampling: dict, stops: list[str], seed: int | None) -> Generated:
        with self.lock:
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**self.kwargs(ids, max_tokens, sampling))
        new = out[0, len(ids):].tolist()
        self.metrics.tokens.inc(len(new))
        text, stopped = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), stops)
        return Generated(text, len(ids), len(new), self.finish(new, max_tokens, stopped))

    def stream(self, ids: list[int], max_tokens: int, sampling: dict, stops: list[str], seed: int | None):
        """Yields text pieces (stop strings cut), then finally one `Generated` with the counts."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        halt, result = threading.Event(), {}
        kwargs = self.kwargs(ids, max_tokens, sampling)
        kwargs.update(streamer=streamer, stopping_criteria=StoppingCriteriaList([EventStop(halt)]))

        def target():
            try:
                with torch.no_grad():
                    result["out"] = self.model.generate(**kwargs)
            except Exception as exc:  # surfaced after the stream ends
                result["error"] = exc
                streamer.end()

        with self.lock:
            if seed is not None:
                torch.manual_seed(seed)
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            scanner, stopped, pieces = StopScanner(stops), False, []
            try:
                for piece in streamer:
                    text, stopped = scanner.feed(piece)
                    if text:
                        pieces.append(text)
                        yield text
                    if stopped:
                        break
                if not stopped and (rest := scanner.flush()):
                    pieces.append(rest)
                    yield rest
            finally:
                halt.set()  # also on client disconnect (generator closed)
                thread.join()
        if "error" in result:
            raise result["error"]
        new = result["out"][0, len(ids):].tolist()
        self.metrics.tokens.inc(len(new))
        yield Generated("".join(pieces), len(ids), len(new), self.finish(new, max_tokens, stopped))


# ---------------------------------------------------------------- the app


def sampling_of(req: Sampling) -> dict:
    if not req.temperature:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": req.temperature, **({"top_p": req.top_p} if req.top_p else {})}


def stops_of(req: Sampling) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise HTTPException(400, "stop: at most 4 stop sequences")
    return stops


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(g: Generated) -> dict:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens}


class Server:
    """Request handling shared by the routes: validation against the limits, then generation."""

    def __init__(self, model, tokenizer, model_name: str, limits: ServeLimits, metrics: Metrics):
        self.tokenizer, self.model_name, self.limits = tokenizer, model_name, limits
        self.gen = Generator(model, tokenizer, metrics)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise HTTPException(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'")

    def max_tokens(self, requested: int | None) -> int:
        if requested is not None and requested > self.limits.max_tokens:
            limit = self.limits.max_tokens
            raise HTTPException(400, f"max_tokens={requested} is above this server's limit max_tokens={limit}")
        return requested or self.limits.max_tokens

    def render(self, messages: list[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # template rejects the conversation (e.g. role order)
            raise HTTPException(400, f"messages: the chat template rejected them: {exc}") from None

    def encode(self, text: str, special: bool) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        if len(ids) > self.limits.max_prompt_tokens:
            raise HTTPException(400, f"The prompt is {len(ids)} tokens, above this server's limit "
                                     f"max_prompt_tokens={self.limits.max_prompt_tokens}")
        return ids

    def chat_prompt(self, messages: list[Message]) -> tuple[list[int], bool]:
        """Token ids of the rendered conversation, and whether the prompt opens a reasoning block."""
        rendered = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        prompt = self.render(rendered)  # the template writes BOS itself
        return self.encode(prompt, special=False), prompt.rstrip().endswith(THINK_OPEN)


def chat_message(g: Generated, opened: bool) -> dict:
    reasoning, answer = split_reasoning_output(g.text, opened)
    message = {"role": "assistant", "content": answer}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def chat_chunks(server: Server, req: ChatRequest, ids: list[int], opened: bool, max_tokens: int):
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": server.model_name}

    def chunk(delta: dict, finish=None) -> str:
        return sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    yield chunk({"role": "assistant", "content": ""})
    splitter, final = StreamSplitter(opened), None
    for item in server.gen.stream(ids, max_tokens, sampling_of(req), stops_of(req), req.seed):
        if isinstance(item, Generated):
            final = item
            break
        for field, text in splitter.feed(item):
            yield chunk({field: text})
    for field, text in splitter.finish():
        yield chunk({field: text})
    yield chunk({}, final.finish_reason)
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": usage(final)})
    yield "data: [DONE]\n\n"


def completion_chunks(server: Server, req: CompletionRequest, ids: list[int], max_tokens: int):
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": server.model_name}
    for item in server.gen.stream(ids, max_tokens, sampling_of(req), stops_of(req), req.seed):
        text, finish = ("", item.finish_reason) if isinstance(item, Generated) else (item, None)
        yield sse({**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})
        if finish and req.stream_options and req.stream_options.include_usage:
            yield sse({**base, "choices": [], "usage": usage(item)})
    yield "data: [DONE]\n\n"


def event_stream(chunks) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(model, tokenizer, model_name: str, api_key: str | None = None,
               limits: ServeLimits = ServeLimits()) -> FastAPI:
    """The FastAPI app serving `model`; its metrics live in the app's own CollectorRegistry."""
    app = FastAPI(title="r1tune", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics()
    server = Server(model, tokenizer, model_name, limits, metrics)
    app.state.server, app.state.metrics = server, metrics
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts 401/413 too

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = {404: "model_not_found", 413: "request_too_large"}.get(exc.status_code)
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
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "r1tune"}]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        server.check_model(req.model)
        max_tokens = server.max_tokens(req.max_completion_tokens or req.max_tokens)
        stops_of(req)
        ids, opened = server.chat_prompt(req.messages)
        if req.stream:
            return event_stream(chat_chunks(server, req, ids, opened, max_tokens))
        g = server.gen.run(ids, max_tokens, sampling_of(req), stops_of(req), req.seed)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "usage": usage(g),
                "choices": [{"index": 0, "message": chat_message(g, opened), "finish_reason": g.finish_reason,
                             "logprobs": None}]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        server.check_model(req.model)
        max_tokens = server.max_tokens(req.max_completion_tokens or req.max_tokens)
        stops_of(req)
        ids = server.encode(req.prompt, special=True)  # raw text: the tokenizer adds BOS
        if req.stream:
            return event_stream(completion_chunks(server, req, ids, max_tokens))
        g = server.gen.run(ids, max_tokens, sampling_of(req), stops_of(req), req.seed)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "usage": usage(g),
                "choices": [{"index": 0, "text": g.text, "finish_reason": g.finish_reason, "logprobs": None}]}

    @app.post("/predict")
    def predict(req: PredictRequest):
        ids, opened = server.chat_prompt([Message(role="user", content=req.text)])
        g = server.gen.run(ids, server.max_tokens(req.max_tokens), {"do_sample": False}, [], None)
        reasoning, answer = split_reasoning_output(g.text, opened)
        return {"text": answer, "reasoning": reasoning}

    return app
