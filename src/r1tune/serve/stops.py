"""Stop strings for whole texts and for text arriving in pieces."""

from __future__ import annotations


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

