"""ASGI middleware: API key and body-size guard, request metrics (Prometheus)."""

from __future__ import annotations

import hmac
import json
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from r1tune.serve.protocol import error_body

OPEN_PATHS = {"/health"}
KNOWN_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/predict", "/health", "/metrics"}


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
        self.batch_size = Histogram("r1tune_batch_size", "Requests in each decoding step", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.waiting = Gauge("r1tune_requests_waiting", "Requests waiting for a batch seat", registry=self.registry)

