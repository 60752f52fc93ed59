"""Callbacks: what a run does around the engine's loop without being part of it.

The engine calls every callback, in list order, at these points of a run:

    setup(engine)                     once, after the batch plan, before the optimizer is built
    on_resume(engine, step)           before a checkpoint's optimizer state is loaded
    on_train_begin(engine)
    per optimizer step:
        on_step_begin(engine, step)
        ... forward + backward over the step's micro-batches ...
        on_backward_end(engine, step)  before unscaling and clipping (extra loss terms go here)
        on_gradients(engine, step)     after unscaling, before clipping (judge true gradients)
        before_update / after_update(engine, step)   around optimizer.step()
        on_step_end(engine, step)      step = optimizer steps done so far
    on_log(engine, record)            may add fields to a train log record
    on_evaluate(engine, step, metrics) may add metrics (later callbacks see them) or ask to stop
    on_train_end(engine)

A callback asks the engine to stop with `engine.request_stop(reason, checkpoint=...)` and scales
the learning rate through `lr_scale`. Its state (if any) goes into checkpoints under `key`, so a
resumed run behaves as an uninterrupted one.
"""

from __future__ import annotations


class Callback:
    key: str | None = None  # name of its state in a checkpoint; None: it keeps none

    def setup(self, engine) -> None: ...
    def on_resume(self, engine, step: int) -> None: ...
    def on_train_begin(self, engine) -> None: ...
    def on_step_begin(self, engine, step: int) -> None: ...
    def on_backward_end(self, engine, step: int) -> None: ...
    def on_gradients(self, engine, step: int) -> None: ...
    def before_update(self, engine, step: int) -> None: ...
    def after_update(self, engine, step: int) -> None: ...
    def on_step_end(self, engine, step: int) -> None: ...
    def on_log(self, engine, record: dict) -> None: ...
    def on_evaluate(self, engine, step: int, metrics: dict) -> None: ...
    def on_train_end(self, engine) -> None: ...

    @property
    def lr_scale(self) -> float:
        return 1.0

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None: ...


class Callbacks:
    """The run's callbacks as one: `callbacks.on_step_end(engine, step)` calls each in order."""

    HOOKS = ("setup", "on_resume", "on_train_begin", "on_step_begin", "on_backward_end", "on_gradients",
             "before_update", "after_update", "on_step_end", "on_log", "on_evaluate", "on_train_end")

    def __init__(self, items: list[Callback]):
        self.items = list(items)

    def __getattr__(self, hook: str):
        if hook not in self.HOOKS:
            raise AttributeError(hook)

        def call(*args) -> None:
            for item in self.items:
                getattr(item, hook)(*args)
        return call

    @property
    def lr_scale(self) -> float:
        scale = 1.0
        for item in self.items:
            scale *= item.lr_scale
        return scale

    def state_dict(self) -> dict:
        return {item.key: state for item in self.items if item.key and (state := item.state_dict()) is not None}

    def load_state_dict(self, state: dict) -> None:
        for item in self.items:
            if item.key and state.get(item.key):
                item.load_state_dict(state[item.key])
