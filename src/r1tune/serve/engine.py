"""Dynamic batching: one thread runs the model for every request that is waiting.

Requests queue in arrival order. When the model is idle the engine waits `wait_s` for company,
then starts a batch with the oldest request and the ones behind it that use the same adapter
(up to `max_batch`). Between two decoding steps, newly arrived requests of that adapter join the
running batch, as long as no request for another adapter has been waiting longer (so no adapter
starves); a finished request leaves at once. One thread owns the model, so switching adapters
never races a forward pass.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from r1tune.models.decode import Batch, Row
from r1tune.serve.ticket import Ticket


class QueueFull(Exception):
    pass


OLDEST = object()  # _take: the adapter of the oldest waiting request


class Engine:
    def __init__(self, model, pad_id: int, activate=None, max_batch: int = 32, wait_s: float = 0.005,
                 max_queue: int = 256, metrics=None):
        self.model, self.pad_id, self.activate = model, pad_id, activate or (lambda adapter: None)
        self.max_batch, self.wait_s, self.max_queue, self.metrics = max_batch, wait_s, max_queue, metrics
        self.device = next(model.parameters()).device
        self.pending: deque[Ticket] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.steps = 0  # decoding steps run (tests compare it with the tokens generated)
        model.eval()
        self.thread = threading.Thread(target=self._loop, name="r1tune-engine", daemon=True)
        self.thread.start()

    def submit(self, ticket: Ticket) -> Ticket:
        with self.cond:
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are already waiting (serve_max_queue={self.max_queue})")
            self.pending.append(ticket)
            self._gauge()
            self.cond.notify()
        return ticket

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=30)

    # ---- the engine thread
    def _loop(self) -> None:
        while (wave := self._take_wave()) is not None:
            seated = list(wave)
            try:
                self._run(wave, seated)
            except Exception as exc:  # a failed forward fails its requests, not the server
                for ticket in seated:
                    ticket.fail(exc)

    def _take_wave(self) -> list[Ticket] | None:
        with self.cond:
            while not self.pending and not self.closed:
                self.cond.wait()
            if self.closed:
                return None
        if self.wait_s and len(self.pending) < self.max_batch:
            time.sleep(self.wait_s)  # let simultaneous requests arrive together
        return self._take(self.max_batch, OLDEST)

    def _take(self, room: int, adapter) -> list[Ticket]:
        """Up to `room` live tickets from the front of the queue that use `adapter` (OLDEST: the
        oldest ticket's); stops at the first ticket for another adapter, which keeps its turn."""
        taken = []
        with self.cond:
            while self.pending and len(taken) < room:
                ticket = self.pending[0]
                if ticket.cancelled.is_set():  # its client left while it waited
                    self.pending.popleft()
                    continue
                if adapter is OLDEST:
                    adapter = ticket.adapter
                if ticket.adapter != adapter:
                    break
                taken.append(self.pending.popleft())
            self._gauge()
        return taken

    def _run(self, wave: list[Ticket], seated: list[Ticket]) -> None:
        if not wave:
            return
        adapter = wave[0].adapter
        self.activate(adapter)
        batch = Batch(self.model, [self._row(t) for t in wave], self.pad_id, self.device)
        while batch.rows:
            room = self.max_batch - len(batch.rows)
            if room and batch.can_join and (joining := self._take(room, adapter)):
                seated += joining
                batch.join([self._row(t) for t in joining])
            if batch.rows:
                if self.metrics is not None:
                    self.metrics.batch_size.observe(len(batch.rows))
                batch.step()
                self.steps += 1

    def _row(self, ticket: Ticket) -> Row:
        return Row(ids=list(ticket.ids), params=ticket.params, emit=ticket.offer)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.waiting.set(len(self.pending))

