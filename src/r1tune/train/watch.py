"""What a run watches while it trains, as engine callbacks (r1tune.train.callbacks): gradient-norm
alarms, update sizes, generation metrics, a learning-rate plateau and early stopping on any metric.

Early stopping and the plateau keep their state (best metric, evaluations without improvement,
learning-rate scale) in checkpoints, so a resumed run stops and decays the learning rate exactly as
an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable

from r1tune.train.callbacks import Callback
from r1tune.train.monitor import EarlyStopper, GradNormMonitor, PlateauScheduler, UpdateTracker, metric_value
from r1tune.ui import say

HEATMAP = "update_heatmap.png"
HEATMAP_COLUMNS = 100  # sampled steps in the heatmap


class GradAlarm(Callback):
    """Per-layer gradient norms every step (logged with the train records); a rising outlier is
    printed and logged, and with mode 'stop' the run saves a checkpoint and stops."""

    def __init__(self, model, mode: str, k: float, ratio: float):
        self.monitor, self.mode = GradNormMonitor(model, k=k, ratio=ratio), mode

    def on_gradients(self, engine, step: int) -> None:
        rising = [a for a in self.monitor.observe(step) if a.norm > a.mean]  # a falling norm is no danger
        for alarm in rising:
            say(f"gradient alarm: {alarm}")
            engine.log.write({"split": "alarm", "step": step, "group": alarm.group, "norm": alarm.norm,
                              "mean": alarm.mean, "std": alarm.std})
        if rising and self.mode == "stop":
            engine.request_stop("grad_norm_alarm is 'stop': saving a checkpoint and stopping", checkpoint=True)

    def on_log(self, engine, record: dict) -> None:
        record.update({f"grad_norm/{k}": round(v, 6) for k, v in self.monitor.norms().items()})


class UpdateHeatmap(Callback):
    """Relative update size per module group at sampled steps; update_heatmap.png at the end.
    `setting` None decides at setup, once the method has chosen what trains (see wants_heatmap)."""

    def __init__(self, setting: bool | None):
        self.setting, self.tracker = setting, None

    def setup(self, engine) -> None:
        if wants_heatmap(engine.model, self.setting):
            self.tracker = UpdateTracker(engine.model, every=max(1, engine.total // HEATMAP_COLUMNS))

    def before_update(self, engine, step: int) -> None:
        if self.tracker:
            self.tracker.before_step(step)

    def after_update(self, engine, step: int) -> None:
        if self.tracker:
            self.tracker.after_step(step)

    def on_train_end(self, engine) -> None:
        if self.tracker and engine.writes and (png := self.tracker.heatmap(engine.output_dir / HEATMAP)):
            say(f"update heatmap: {png}")
            engine.log.add_png("update_heatmap", png, engine.state.global_step)


class GenerationMetrics(Callback):
    """Every `every` steps, generation metrics on a small eval subset (logged); the latest ones join
    each evaluation's metrics, so early stopping and the plateau can watch them."""

    def __init__(self, measure: Callable[[], dict], every: int):
        self.measure, self.every, self.latest = measure, every, {}

    def on_step_end(self, engine, step: int) -> None:
        if step % self.every:
            return
        self.latest = self.measure()
        engine.log.write({"split": "generate", "step": step, **{k: round(v, 6) for k, v in self.latest.items()}})
        say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in self.latest.items()))

    def on_evaluate(self, engine, step: int, metrics: dict) -> None:
        metrics.update(self.latest)


class PlateauLR(Callback):
    """Multiply the learning rate by `factor` after `patience` evaluations without improvement."""
    key = "plateau"

    def __init__(self, metric: str, mode: str, factor: float, patience: int):
        self.metric, self.plateau = metric, PlateauScheduler(factor, patience, mode)

    @property
    def lr_scale(self) -> float:
        return self.plateau.scale

    def on_evaluate(self, engine, step: int, metrics: dict) -> None:
        if self.plateau.update(metric_value(self.metric, metrics)):
            say(f"step {step}: {self.metric} has not improved for {self.plateau.patience} evaluations; "
                f"learning rate x{self.plateau.scale:g}")
            engine.log.write({"split": "plateau", "step": step, "lr_scale": self.plateau.scale})

    def state_dict(self) -> dict:
        return self.plateau.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.plateau.load_state_dict(state)


class EarlyStopping(Callback):
    """Stop after `patience` evaluations without improvement of the metric (patience 0: never)."""
    key = "stopper"

    def __init__(self, metric: str, patience: int, mode: str | None):
        self.stopper = EarlyStopper(metric, patience, mode)

    def on_evaluate(self, engine, step: int, metrics: dict) -> None:
        if self.stopper.update(metrics):
            engine.request_stop(f"early stopping: {self.stopper.metric} has not improved for "
                                f"{self.stopper.patience} evaluations")

    def state_dict(self) -> dict:
        return self.stopper.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stopper.load_state_dict(state)


def watch_callbacks(model, cfg, generation: Callable[[], dict] | None = None) -> list[Callback]:
    """The watching callbacks the config asks for, in the order they must run."""
    items: list[Callback] = []
    if cfg.grad_norm_alarm != "off":
        items.append(GradAlarm(model, cfg.grad_norm_alarm, cfg.grad_norm_alarm_std, cfg.grad_norm_alarm_ratio))
    if cfg.update_heatmap is not False:
        items.append(UpdateHeatmap(cfg.update_heatmap))
    if generation is not None and cfg.generate_metrics_steps:
        items.append(GenerationMetrics(generation, cfg.generate_metrics_steps))
    mode = None if cfg.greater_is_better is None else ("max" if cfg.greater_is_better else "min")
    stopping = EarlyStopping(cfg.best_metric, cfg.early_stopping_patience or 0, mode)
    if cfg.lr_plateau_patience:  # before early stopping: an evaluation lowers the rate, then may stop
        items.append(PlateauLR(cfg.best_metric, stopping.stopper.mode, cfg.lr_plateau_factor,
                               cfg.lr_plateau_patience))
    return items + [stopping]


def wants_heatmap(model, setting: bool | None) -> bool:
    """update_heatmap, or when empty: on when under 10 % of the weights train (the snapshot is cheap)."""
    if setting is not None:
        return setting
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable < 0.1 * sum(p.numel() for p in model.parameters())
