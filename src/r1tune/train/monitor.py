"""Training-time monitors: gradient-norm alarms, relative update sizes, plateau LR scaling, early stopping.

Plain classes with no trainer dependency. Intended order inside one optimizer step:

    backward over all micro-batches
    scaler.unscale_(optimizer)            # fp16 only: judge true gradients, not scaled ones
    alarms = grad_monitor.observe(step)   # before clipping, which would hide the spike
    clip_grad_norm_(...)
    tracker.before_step(step); optimizer.step(); tracker.after_step(step)
    optimizer.zero_grad()

and after each evaluation: `plateau.update(eval_loss)` (multiply the next lr by
`plateau.scale`) and `stopper.update({"loss": ..., "perplexity": ...})`.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from r1tune.errors import UserError, did_you_mean
from r1tune.train.fsdp import whole

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.([^.]+)")
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|head|output|score)\.")


def group_name(name: str, by: str = "layer") -> str:
    """'layers.N' (by='layer') or 'layers.N.<child>' (by='layer_type'), else 'embed', 'head' or 'other'."""
    match = _LAYER.search(name)
    if match:
        return f"layers.{match[1]}" + (f".{match[2]}" if by == "layer_type" else "")
    if "embed" in name or re.search(r"(?:^|\.)(?:wte|wpe)\.", name):
        return "embed"
    return "head" if _HEAD.search(name) else "other"


@dataclass
class Alarm:
    step: int
    group: str
    norm: float
    mean: float
    std: float

    def __str__(self) -> str:
        sigmas = abs(self.norm - self.mean) / self.std if self.std > 0 else math.inf
        return (f"step {self.step}: grad norm of {self.group} is {self.norm:.4g}, "
                f"{sigmas:.1f} std from its running mean {self.mean:.4g} (std {self.std:.4g})")


class GradNormMonitor:
    """Per-layer gradient norms each step; alarm when a norm leaves mean ± k·std of its running history
    and, rising, is also at least `ratio` times that mean (noise alone reaches 3-4.5 std and 2x the mean
    on healthy runs, but not 3x: bench/grad_alarm.py)."""

    def __init__(self, model, k: float = 3.0, warmup: int = 10, window: int = 100, ratio: float = 0.0):
        if window < max(warmup, 2):
            raise ValueError(f"window ({window}) must be at least warmup ({warmup}) and 2")
        self.model, self.k, self.warmup, self.window, self.ratio = model, k, max(warmup, 2), window, ratio
        self.history: dict[str, deque] = {}
        self._last: dict[str, float] = {}

    def observe(self, step: int) -> list[Alarm]:
        """Judge this step's norms against the history, then add them (a spike never widens its own band)."""
        self._last = self._group_norms()
        alarms = [a for g, n in self._last.items() if (a := self._judge(step, g, n))]
        for group, norm in self._last.items():
            if math.isfinite(norm):  # one inf/nan would poison the mean for `window` steps
                self.history.setdefault(group, deque(maxlen=self.window)).append(norm)
        return alarms

    def norms(self) -> dict[str, float]:
        """The last observed step's norm per group (for logging)."""
        return dict(self._last)

    def _group_norms(self) -> dict[str, float]:
        squares: dict[str, list] = {}
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                norm = whole(torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32))
                squares.setdefault(group_name(name), []).append(norm ** 2)
        return _sqrt_sums(squares)

    def _judge(self, step: int, group: str, norm: float) -> Alarm | None:
        seen = self.history.get(group, ())
        if len(seen) < self.warmup:
            return None
        mean = sum(seen) / len(seen)
        std = math.sqrt(sum((x - mean) ** 2 for x in seen) / len(seen))
        band = self.k * max(std, 1e-4 * abs(mean))  # a constant history would otherwise alarm on rounding noise
        if math.isfinite(norm) and (abs(norm - mean) <= band or mean < norm < self.ratio * mean):
            return None
        return Alarm(step, group, norm, mean, std)


def _sqrt_sums(squares: dict[str, list]) -> dict[str, float]:
    """sqrt of each group's summed squares, gathered on one device and read back in one sync."""
    if not squares:
        return {}
    device = next(iter(squares.values()))[0].device  # with device_map, params span devices
    totals = torch.stack([torch.stack([s.to(device) for s in parts]).sum() for parts in squares.values()])
    return dict(zip(squares, totals.sqrt().tolist()))


class UpdateTracker:
    """Relative update size ||Δθ|| / ||θ|| per module group per step, for a heatmap (module group × step).

    Memory: a snapshot is a copy of every trainable parameter in its own dtype, so adapters cost
    little, but full fine-tuning costs one extra model copy (offload=True keeps it in CPU memory
    at the price of a host copy per snapshot). `every=N` snapshots only every Nth step.
    """

    def __init__(self, model, groups: str = "layer_type", every: int = 1, offload: bool = False):
        if groups not in ("layer", "layer_type") or every < 1:
            raise ValueError("groups must be 'layer' or 'layer_type' and every >= 1")
        self.model, self.by, self.every, self.offload = model, groups, every, offload
        self.steps: list[int] = []
        self.rows: dict[str, list[float]] = {}  # group -> one value per recorded step (nan where absent)
        self._snapshot: dict[str, torch.Tensor] | None = None
        self._calls = 0

    def before_step(self, step: int | None = None) -> None:
        """Copy the trainable parameters when this step is sampled (step None: count calls instead)."""
        due = (self._calls if step is None else step) % self.every == 0
        self._calls += 1
        self._snapshot = None
        if due:  # frozen weights never change, so they are never copied
            self._snapshot = {name: p.detach().to("cpu" if self.offload else p.device, copy=True)
                              for name, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Record ||θ_after − θ_before|| / ||θ_before|| per group (nan where ||θ_before|| is 0)."""
        if self._snapshot is None:
            return
        deltas: dict[str, list] = {}  # group -> ||Δ||² per tensor
        sizes: dict[str, list] = {}  # group -> ||θ||² per tensor, before the step
        for name, p in self.model.named_parameters():
            old = self._snapshot.get(name)
            if old is not None:
                old = old.to(p.device).float()
                group = group_name(name, self.by)
                deltas.setdefault(group, []).append(whole(torch.linalg.vector_norm(p.float() - old)) ** 2)
                sizes.setdefault(group, []).append(whole(torch.linalg.vector_norm(old)) ** 2)
        self._snapshot = None
        delta, size = _sqrt_sums(deltas), _sqrt_sums(sizes)
        self._record(step, {g: delta[g] / size[g] if size[g] > 0 else math.nan for g in delta})

    def _record(self, step: int, ratios: dict[str, float]) -> None:
        for group in ratios:  # in model order, so heatmap rows run embed, layers..., head
            if group not in self.rows:
                self.rows[group] = [math.nan] * len(self.steps)
        self.steps.append(step)
        for group, row in self.rows.items():
            row.append(ratios.get(group, math.nan))

    def latest(self) -> dict[str, float]:
        """The last recorded step's ratios (for logging)."""
        return {g: row[-1] for g, row in self.rows.items() if not math.isnan(row[-1])} if self.steps else {}

    def heatmap(self, png_path) -> Path | None:
        """Rows = groups, columns = recorded steps, log10 colour; None when nothing was recorded."""
        if not self.steps:
            return None
        import numpy as np
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

        from r1tune.fileio import atomic_path

        values = np.array(list(self.rows.values()), dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.ma.masked_invalid(np.log10(values))  # zero (skipped step) and nan show blank
        fig = Figure(figsize=(min(4 + 0.05 * len(self.steps), 16), min(2 + 0.18 * len(self.rows), 30)))
        ax = fig.add_subplot()
        image = ax.imshow(logs, aspect="auto", interpolation="nearest", cmap="viridis")
        fig.colorbar(image, ax=ax, label="log10 ||Δθ|| / ||θ||")
        ax.set_yticks(range(len(self.rows)), list(self.rows), fontsize=max(4, 9 - len(self.rows) // 20))
        ticks = np.unique(np.linspace(0, len(self.steps) - 1, min(len(self.steps), 10)).astype(int))
        ax.set_xticks(ticks, [str(self.steps[i]) for i in ticks])
        ax.set_xlabel("step")
        ax.set_title("relative update size per module group")
        fig.tight_layout()
        path = Path(png_path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        return path


def _check_mode(mode: str) -> str:
    if mode not in ("min", "max"):
        raise UserError(f"mode must be 'min' or 'max', not {mode!r}")
    return mode


class _Patience:
    """Best value so far and evaluations since it last improved; shared by the two classes below."""

    def __init__(self, mode: str):
        self.mode = _check_mode(mode)
        self.best: float | None = None
        self.bad = 0

    def _improved(self, value: float) -> bool:
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better and not math.isnan(value):
            self.best, self.bad = value, 0
            return True
        self.bad += 1  # nan counts as no improvement
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad = state["best"], state["bad"]


class PlateauScheduler(_Patience):
    """Multiply the learning rate by `factor` after `patience` evaluations without improvement of a metric
    (mode min/max), never below `min_scale`; state_dict/load_state_dict for resume."""

    def __init__(self, factor: float = 0.5, patience: int = 2, mode: str = "min", min_scale: float = 0.0):
        if not 0 < factor < 1:
            raise UserError(f"plateau factor must be between 0 and 1 (exclusive), not {factor}")
        super().__init__(mode)
        self.factor, self.patience, self.min_scale = factor, patience, min_scale
        self._scale = 1.0

    @property
    def scale(self) -> float:
        """Multiply the scheduled lr by this."""
        return self._scale

    def update(self, value: float) -> bool:
        """Record one evaluation; True when it just reduced the scale."""
        if self._improved(value) or self.bad < self.patience:
            return False
        self.bad = 0  # wait a full `patience` again before the next cut
        new = max(self._scale * self.factor, self.min_scale)
        reduced, self._scale = new < self._scale, new
        return reduced

    def state_dict(self) -> dict:
        return {**super().state_dict(), "scale": self._scale}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._scale = state["scale"]


def metric_value(name: str, metrics: dict) -> float:
    """metrics[name], or the one-sentence error naming what the evaluation did measure."""
    if name not in metrics:
        raise UserError(f"early stopping watches metric '{name}', but the evaluation reported only "
                        f"{', '.join(sorted(metrics)) or 'nothing'}{did_you_mean(name, metrics)}")
    return float(metrics[name])


class EarlyStopper(_Patience):
    """Stop after `patience` evaluations without improvement of the named metric (patience <= 0: never).

    mode None picks 'min' for names containing loss/ppl/perplexity, else 'max' (accuracy, bleu, ...).
    """

    def __init__(self, metric: str, patience: int, mode: str | None = None):
        lowered = metric.lower()
        super().__init__(mode or ("min" if any(w in lowered for w in ("loss", "ppl", "perplexity", "rejected")) else "max"))
        self.metric, self.patience = metric, patience

    def update(self, metrics: dict) -> bool:
        """Record one evaluation's metrics; True = stop training."""
        self._improved(metric_value(self.metric, metrics))
        return 0 < self.patience <= self.bad
