"""R1 output parts and stop strings, for whole texts and for text arriving in pieces.

`reasoning_content` is the text before `</think>` (the R1 template opens `<think>\n` in the prompt),
`content` the answer after it, as DeepSeek's own API splits them.
"""

from __future__ import annotations

from r1tune.data.templates import THINK_CLOSE, THINK_OPEN

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

