"""One request's seat in the engine: the engine puts token ids in, the HTTP side reads text out.

The engine thread calls `offer(token)` and `fail(exc)`; the request thread iterates `read(...)`,
which turns tokens into text pieces (incrementally, never splitting a UTF-8 character), cuts
them at stop strings, and ends with a `Generated` summary. Closing the reader early (a stop
string, a client that hung up) cancels the request, and the engine drops its row at the next step.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from r1tune.serve.stops import StopScanner
from r1tune.models.sampling import Params

CONTEXT_TOKENS = 5  # prompt tokens decoded before the first new one (SentencePiece leading spaces)
READ_TIMEOUT_S = 600.0


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass
class _Finished:
    reason: str


class Ticket:
    def __init__(self, ids: list[int], params: Params, adapter: str | None, eos_ids: set[int]):
        self.ids, self.params, self.adapter, self.eos_ids = list(ids), params, adapter, eos_ids
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.generated = 0

    # ---- engine side
    def offer(self, token: int) -> bool:
        """Take one generated token; False when the request wants no more."""
        self.generated += 1
        self.events.put(token)
        if token in self.eos_ids or self.cancelled.is_set():
            self.events.put(_Finished("stop"))
            return False
        if self.generated >= self.params.max_tokens:
            self.events.put(_Finished("length"))
            return False
        return True

    def fail(self, exc: BaseException) -> None:
        self.events.put(exc)

    def cancel(self) -> None:
        self.cancelled.set()

    # ---- request side
    def read(self, tokenizer, stops: list[str]):
        """Yields text pieces, then one `Generated`; cancels the request if closed early."""
        decoder, scanner, pieces = IncrementalDecoder(tokenizer, self.ids), StopScanner(stops), []
        reason, hit = "stop", False
        try:
            while True:
                event = self.events.get(timeout=READ_TIMEOUT_S)
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, _Finished):
                    reason = event.reason
                    break
                text, hit = scanner.feed(decoder.add(event))
                if text:
                    pieces.append(text)
                    yield text
                if hit:
                    break
            if not hit:  # bytes of a character the generation stopped inside decode as U+FFFD, as decode() gives
                text, hit = scanner.feed(decoder.flush())
                rest = text + ("" if hit else scanner.flush())
                if rest:
                    pieces.append(rest)
                    yield rest
        finally:
            self.cancel()
        yield Generated("".join(pieces), len(self.ids), self.generated, "stop" if hit else reason)


class IncrementalDecoder:
    """Decodes a growing token list piece by piece: a few tokens of context are decoded twice and
    the difference is the new text; a piece ending inside a UTF-8 character waits for the rest."""

    def __init__(self, tokenizer, prompt: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt[-CONTEXT_TOKENS:])
        self.prefix, self.read = 0, len(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before, now = self._pending()
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """The text still held back (a piece ending inside a UTF-8 character), once no token follows."""
        before, now = self._pending()
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):] if len(now) > len(before) else ""

    def _pending(self) -> tuple[str, str]:
        """(the context decoded alone, the context with the tokens not yet returned)."""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        return decode(self.ids[self.prefix:self.read]), decode(self.ids[self.prefix:])
