"""Terminal chat with a fine-tuned output dir: streaming, reasoning shown apart from the answer.

The model comes from r1tune.models.run_loading (a run dir) or r1tune.models.configured (a config)."""

from __future__ import annotations

import sys

from r1tune.data.reasoning import StreamSplitter, prompt_opens_reasoning

DIM, RESET = "\033[2m", "\033[0m"


class ReasoningPrinter:
    """Prints streamed text; reasoning dimmed under its own heading, split by data.reasoning's
    StreamSplitter (the parts serve returns as reasoning_content and content)."""

    def __init__(self, out=None, reasoning_open: bool = True):
        out = out or sys.stdout  # looked up now: stdout may have been replaced since import
        self.out, self.color = out, out.isatty()
        self.splitter, self.heading = StreamSplitter(reasoning_open), None
        if reasoning_open:
            self._head("reasoning_content")

    def feed(self, text: str) -> None:
        self._print(self.splitter.feed(text))

    def finish(self) -> None:
        self._print(self.splitter.finish())
        self._write("\n")

    def _print(self, pieces: list[tuple[str, str]]) -> None:
        for part, text in pieces:
            if part != self.heading:
                self._head(part)
            self._write(text, dim=part == "reasoning_content")

    def _head(self, part: str) -> None:
        """[reasoning] opens the output; [answer] follows reasoning (a plain answer needs no heading)."""
        if part == "reasoning_content":
            self._write("[reasoning]\n", dim=True)
        elif self.heading is not None:
            self._write("\n[answer]\n")
        self.heading = part

    def _write(self, text: str, dim: bool = False) -> None:
        self.out.write(f"{DIM}{text}{RESET}" if dim and self.color else text)
        self.out.flush()


def reply(model, tokenizer, messages: list[dict], max_new_tokens: int, temperature: float, out=None) -> str:
    """Stream one assistant reply to `out`; return the full generated text. It decodes with the
    server's engine, so chat and serve give the same tokens (virtual-token adapters included)."""
    from r1tune.models.decode import eos_ids_of
    from r1tune.serve.engine import Engine
    from r1tune.models.sampling import Params
    from r1tune.serve.ticket import Generated, Ticket

    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]  # the template writes BOS itself
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine = Engine(model, pad, max_batch=1, wait_s=0)
    printer, pieces = ReasoningPrinter(out, reasoning_open=prompt_opens_reasoning(prompt)), []
    try:
        ticket = engine.submit(Ticket(ids, Params(max_new_tokens, temperature), None, eos_ids_of(model, tokenizer)))
        for piece in ticket.read(tokenizer, []):
            if not isinstance(piece, Generated):
                pieces.append(piece)
                printer.feed(piece)
    finally:
        engine.close()
    printer.finish()
    return "".join(pieces)


def chat_loop(model, tokenizer, system: str | None, max_new_tokens: int, temperature: float) -> None:
    messages = [{"role": "system", "content": system}] if system else []
    print("r1tune chat — type a message; /clear starts over, /exit quits.")
    while True:
        try:
            text = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/clear":
            messages = messages[:1] if system else []
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, messages, max_new_tokens, temperature)
        messages.append({"role": "assistant", "content": answer})
