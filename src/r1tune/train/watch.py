"""What the trainer watches while it trains: gradient-norm alarms, update sizes, generation metrics,
a learning-rate plateau and early stopping on any metric. The trainer calls it at fixed points:

    after backward:      alarms = watch.after_backward(step)      (before clipping)
    around the update:   watch.before_update(step) / watch.after_update(step)
    every step:          watch.maybe_generate(step, log)
    after an evaluation: stop = watch.after_eval(step, {"loss": ..., "perplexity": ...}, log)
    at the end:          watch.finish(output_dir)

Its state (best metric, evaluations without improvement, learning-rate scale) goes into the
checkpoint, so a resumed run stops and decays the learning rate exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from r1tune.train.logs import MetricsLog
from r1tune.train.monitor import EarlyStopper, GradNormMonitor, PlateauScheduler, UpdateTracker

HEATMAP = "update_heatmap.png"
HEATMAP_COLUMNS = 100  # sampled steps in the heatmap


class TrainingWatch:
    def __init__(self, model, cfg, total_steps: int, generation: Callable[[], dict] | None = None):
        self.cfg, self.generation = cfg, generation
        self.grads = GradNormMonitor(model, k=cfg.grad_norm_alarm_std, ratio=cfg.grad_norm_alarm_ratio) \
            if cfg.grad_norm_alarm != "off" else None
        self.updates = UpdateTracker(model, every=max(1, total_steps // HEATMAP_COLUMNS)) \
            if wants_heatmap(model, cfg.update_heatmap) else None
        mode = None if cfg.greater_is_better is None else ("max" if cfg.greater_is_better else "min")
        self.stopper = EarlyStopper(cfg.metric_for_best_model, cfg.early_stopping_patience or 0, mode)
        self.plateau = PlateauScheduler(cfg.lr_plateau_factor, cfg.lr_plateau_patience, self.stopper.mode) \
            if cfg.lr_plateau_patience else None
        self.latest_generation: dict = {}
        self.alarmed = False

    @property
    def lr_scale(self) -> float:
        return self.plateau.scale if self.plateau else 1.0

    def after_backward(self, step: int, log: MetricsLog) -> bool:
        """Judge the per-layer gradient norms; True when an alarm asks the run to stop."""
        if self.grads is None:
            return False
        rising = [a for a in self.grads.observe(step) if a.norm > a.mean]  # a falling norm is no danger
        for alarm in rising:
            tqdm.write(f"gradient alarm: {alarm}")
            log.write({"split": "alarm", "step": step, "group": alarm.group, "norm": alarm.norm,
                       "mean": alarm.mean, "std": alarm.std})
        self.alarmed = bool(rising) and self.cfg.grad_norm_alarm == "stop"
        return self.alarmed

    def grad_norms(self) -> dict[str, float]:
        return {f"grad_norm/{k}": round(v, 6) for k, v in (self.grads.norms() if self.grads else {}).items()}

    def before_update(self, step: int) -> None:
        if self.updates:
            self.updates.before_step(step)

    def after_update(self, step: int) -> None:
        if self.updates:
            self.updates.after_step(step)

    def maybe_generate(self, step: int, log: MetricsLog) -> None:
        """Generation metrics on the small eval subset every generate_metrics_steps."""
        every = self.cfg.generate_metrics_steps
        if self.generation is None or not every or step % every:
            return
        self.latest_generation = self.generation()
        log.write({"split": "generate", "step": step, **{k: round(v, 6) for k, v in self.latest_generation.items()}})
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in self.latest_generation.items()))

    def after_eval(self, step: int, metrics: dict, log: MetricsLog) -> bool:
        """Plateau and early stopping on metric_for_best_model; True = stop."""
        metrics = {**metrics, **self.latest_generation}
        value = self._metric(metrics)
        if self.plateau and self.plateau.update(value):
            tqdm.write(f"step {step}: {self.stopper.metric} has not improved for {self.plateau.patience} "
                       f"evaluations; learning rate x{self.plateau.scale:g}")
            log.write({"split": "plateau", "step": step, "lr_scale": self.plateau.scale})
        if self.stopper.update(metrics):
            tqdm.write(f"early stopping: {self.stopper.metric} has not improved for "
                       f"{self.stopper.patience} evaluations")
            return True
        return False

    def _metric(self, metrics: dict) -> float:
        if self.stopper.metric not in metrics:
            self.stopper.update(metrics)  # raises the one-sentence error naming the metrics measured
        return float(metrics[self.stopper.metric])

    def finish(self, output_dir: Path) -> Path | None:
        return self.updates.heatmap(output_dir / HEATMAP) if self.updates else None

    def state_dict(self) -> dict:
        return {"stopper": self.stopper.state_dict(), "plateau": self.plateau.state_dict() if self.plateau else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("stopper"):
            self.stopper.load_state_dict(state["stopper"])
        if self.plateau and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])


def wants_heatmap(model, setting: bool | None) -> bool:
    """update_heatmap, or when empty: on when under 10 % of the weights train (the snapshot is cheap)."""
    if setting is not None:
        return setting
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable < 0.1 * sum(p.numel() for p in model.parameters())
