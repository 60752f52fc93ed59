"""R1 reasoning (`<think>…</think>`) apart from the answer: the one parser that data, evaluation,
chat and serve use, for stored messages, whole generated texts and text arriving in pieces.

Generated text: the reasoning runs from the start (the prompt opened `<think>`) or from a leading
`<think>` the model wrote, to the first `</think>`; the rest is the answer. That is how DeepSeek's API
splits `reasoning_content` from `content`, and the only split a stream can make without waiting for
the end. A block never closed is all reasoning: generation stopped mid-thought and the answer is "".
Stored messages (training data) may quote the tag inside their reasoning, so there the answer is what
follows the last `</think>`, as the official R1 chat template strips assistant turns.
"""

from __future__ import annotations

from r1tune.data.templates import THINK_CLOSE, THINK_OPEN


def split_reasoning(content: str) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a stored assistant message that may hold <think>…</think>."""
    if THINK_CLOSE not in content:
        return None, content.strip()
    before, _, answer = content.rpartition(THINK_CLOSE)
    reasoning = before.strip()
    if reasoning.startswith(THINK_OPEN):
        reasoning = reasoning[len(THINK_OPEN):].strip()
    return reasoning, answer.strip()


def split_output(text: str, opened: bool) -> tuple[str | None, str]:
    """(reasoning or None, answer) of generated text; `opened`: the prompt ended with `<think>`."""
    if not opened:
        if not text.lstrip().startswith(THINK_OPEN):
            return None, text.strip()
        text = text.lstrip()[len(THINK_OPEN):]
    reasoning, closed, answer = text.partition(THINK_CLOSE)
    return reasoning.strip(), answer.strip() if closed else ""


def prompt_opens_reasoning(prompt: str) -> bool:
    """The rendered prompt ends inside an open `<think>` block (newer R1 templates)."""
    return prompt.rstrip().endswith(THINK_OPEN)


class StreamSplitter:
    """Routes streamed text to ("reasoning_content" | "content", text) pieces, holding back a possible
    partial tag; the parts equal `split_output`'s up to whitespace at their ends."""

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
