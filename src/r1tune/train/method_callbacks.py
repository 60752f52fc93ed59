"""Fine-tuning methods that act during training, as engine callbacks: AdaLoRA's rank budget and
progressive unfreezing."""

from __future__ import annotations

import torch

from r1tune.config import parse_schedule
from r1tune.models.adalora import orthogonal_penalty, update_ranks
from r1tune.models.unfreeze import Unfreezer
from r1tune.train import optimizers
from r1tune.train.callbacks import Callback
from r1tune.ui import say


class AdaLoraRanks(Callback):
    """AdaLoRA: the orthogonality penalty once per step (PEFT adds it once per forward of a whole
    batch), and the rank re-allocation after each update."""

    def on_backward_end(self, engine, step: int) -> None:
        penalty = orthogonal_penalty(engine.model)
        if torch.is_tensor(penalty):
            engine.backward(penalty)

    def after_update(self, engine, step: int) -> None:
        update_ranks(engine.model, step)


class ProgressiveUnfreeze(Callback):
    """unfreeze_schedule: entries due at a step make their weights trainable, and the new parameters
    join the optimizer as new groups (at the scheduled learning rate)."""

    def __init__(self, schedule: list[dict]):
        self.entries = parse_schedule(schedule)
        self.unfreezer = None
        self.unfrozen: list[tuple] = []  # (entry, [(name, param)]) applied before the first step

    def setup(self, engine) -> None:  # before the optimizer: step-0 entries are part of its first groups
        self.unfreezer = Unfreezer(engine.model, self.entries, engine.plan.per_epoch)
        self.unfrozen = self.unfreezer.advance(0)

    def on_resume(self, engine, step: int) -> None:
        self._advance(engine, step - 1, log=False)  # the checkpoint's optimizer has a group for each of them

    def on_train_begin(self, engine) -> None:
        if engine.state.global_step == 0:
            for entry, new in self.unfrozen:
                self._report(engine, 0, entry, new)

    def on_step_begin(self, engine, step: int) -> None:
        self._advance(engine, step, log=True)

    def _advance(self, engine, step: int, log: bool) -> None:
        cfg = engine.cfg
        for entry, new in self.unfreezer.advance(step):
            for group in optimizers.param_groups(new, cfg.weight_decay, cfg.loraplus_lr_ratio,
                                                 cfg.loraplus_lr_embedding, cfg.learning_rate, engine.no_decay):
                group["lr"] = cfg.learning_rate * group["lr_scale"]  # the schedule sets it before the step
                engine.optimizer.add_param_group(group)
            if log:
                self._report(engine, step, entry, new)

    @staticmethod
    def _report(engine, step: int, entry, new: list) -> None:
        count = sum(p.numel() for _, p in new)
        say(f"step {step}: unfroze {entry.describe()} ({count:,} parameters)")
        engine.log.write({"split": "unfreeze", "step": step, "unfrozen": entry.describe(), "parameters": count,
                          "tensors": len(new)})
