"""Request handling shared by the routes: check a request against the limits, render and encode
its prompt with the chosen model's tokenizer, and hand it to the batching engine."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import HTTPException

from r1tune.data.templates import THINK_OPEN
from r1tune.models.decode import eos_ids_of
from r1tune.serve.engine import Engine, QueueFull
from r1tune.serve.models import Served, ServedSet
from r1tune.serve.protocol import Message, Sampling
from r1tune.models.sampling import Params
from r1tune.serve.ticket import Generated, Ticket


@dataclass
class ServeLimits:
    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int = 4096
    max_tokens: int = 2048


@dataclass
class BatchOptions:
    max_batch: int = 32
    wait_s: float = 0.005
    max_queue: int = 256


class Handler:
    def __init__(self, served: ServedSet, limits: ServeLimits, metrics, options: BatchOptions):
        self.entries, self.limits, self.metrics = served.entries, limits, metrics
        first = next(iter(self.entries.values())).tokenizer
        pad = first.pad_token_id if first.pad_token_id is not None else first.eos_token_id
        self.eos_ids = eos_ids_of(served.model, first)
        self.context = getattr(getattr(served.model, "config", None), "max_position_embeddings", None)
        self.engine = Engine(served.model, pad, served.activate, options.max_batch, options.wait_s,
                             options.max_queue, metrics)

    @property
    def default(self) -> Served:
        return next(iter(self.entries.values()))

    def entry(self, name: str) -> Served:
        if name not in self.entries:
            raise HTTPException(404, f"The model '{name}' does not exist; this server serves "
                                     f"{', '.join(repr(n) for n in self.entries)}")
        return self.entries[name]

    def max_tokens(self, requested: int | None) -> int:
        if requested is not None and requested > self.limits.max_tokens:
            limit = self.limits.max_tokens
            raise HTTPException(400, f"max_tokens={requested} is above this server's limit max_tokens={limit}")
        return requested or self.limits.max_tokens

    def chat_prompt(self, entry: Served, messages: list[Message]) -> tuple[list[int], bool]:
        """Token ids of the rendered conversation, and whether the prompt opens a reasoning block."""
        rendered = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        try:
            prompt = entry.tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template rejects the conversation (e.g. role order)
            raise HTTPException(400, f"messages: the chat template rejected them: {exc}") from None
        return self.encode(entry, prompt, special=False), prompt.rstrip().endswith(THINK_OPEN)  # BOS is in the text

    def encode(self, entry: Served, text: str, special: bool) -> list[int]:
        ids = entry.tokenizer(text, add_special_tokens=special)["input_ids"]
        if len(ids) > self.limits.max_prompt_tokens:
            raise HTTPException(400, f"The prompt is {len(ids)} tokens, above this server's limit "
                                     f"max_prompt_tokens={self.limits.max_prompt_tokens}")
        if not ids or (self.context and len(ids) >= self.context):
            raise HTTPException(400, f"The prompt is {len(ids)} tokens; this model reads 1 to "
                                     f"{(self.context or 2) - 1} tokens")
        return ids

    def generate(self, entry: Served, ids: list[int], max_tokens: int, req: Sampling | None, stops: list[str]):
        """Queue a generation now (a full queue is a 429 here); the returned iterator yields text
        pieces and then one Generated."""
        ticket = self.start(entry, ids, max_tokens, req)

        def pieces():
            for item in ticket.read(entry.tokenizer, stops):
                if isinstance(item, Generated):
                    self.metrics.tokens.inc(item.completion_tokens)
                yield item
        return pieces()

    def start(self, entry: Served, ids: list[int], max_tokens: int, req: Sampling | None) -> Ticket:
        """Queue a generation; max_tokens is cut to the room left in the model's context."""
        if self.context:
            max_tokens = min(max_tokens, self.context - len(ids))
        params = Params(max_tokens, req.temperature or 0.0, req.top_p or 1.0, req.seed) if req else Params(max_tokens)
        try:
            return self.engine.submit(Ticket(ids, params, entry.adapter, self.eos_ids))
        except QueueFull as exc:
            raise HTTPException(429, f"The server is busy: {exc}; retry shortly") from None

    def close(self) -> None:
        self.engine.close()


def stops_of(req: Sampling) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise HTTPException(400, "stop: at most 4 stop sequences")
    return stops
