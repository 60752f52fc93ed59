"""The training loop: AdamW, warmup + schedule, accumulation, clipping, eval, checkpoints.

One optimizer step consumes `gradient_accumulation_steps` micro-batches; each
micro-batch's summed token loss is divided by the number of target tokens in the
whole step, so the step's gradient is that of the mean over all its tokens no
matter how the tokens fall into micro-batches.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from r1tune.config import parse_schedule
from r1tune.data.encode import Example
from r1tune.errors import UserError
from r1tune.models.adalora import is_adalora, orthogonal_penalty, update_ranks
from r1tune.models.attention import mask_format
from r1tune.models.quantize import is_quantized
from r1tune.models.unfreeze import Unfreezer
from r1tune.train import batching, checkpoint, optimizers, schedule
from r1tune.train.checkpoint import TrainerState
from r1tune.train.logs import MetricsLog
from r1tune.train.held_out import LossSum, held_out_sum, perplexity
from r1tune.train.memory import checkpointing_decision, release_free_memory
from r1tune.train.watch import TrainingWatch


@dataclass
class TrainResult:
    global_step: int
    last_loss: float | None
    eval_loss: float | None
    stopped_early: bool
    train_runtime: float = 0.0  # seconds in the training loop (evaluation excluded)
    train_tokens: int = 0  # non-padding tokens trained on
    model: object = field(default=None, repr=False)  # the trained model, for callers that go on using it


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_precision(fp16: bool) -> None:
    if fp16 and not torch.cuda.is_available():
        raise UserError("config key 'fp16' needs a CUDA GPU; on CPU use 'bf16: true' or neither")


def use_bf16(setting: bool | None, fp16: bool, device: torch.device) -> bool:
    """The bf16 key, or when it is empty: bf16 where the hardware does bf16 matmuls natively."""
    if setting is not None:
        return setting
    if fp16:
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from r1tune.envinfo import cpu_bf16

    return cpu_bf16()


def autocast_context(device: torch.device, bf16: bool, fp16: bool):
    if bf16 or fp16:
        return torch.autocast(device.type, dtype=torch.bfloat16 if bf16 else torch.float16)
    return contextlib.nullcontext()


def total_steps(cfg, n_examples: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = batching.steps_per_epoch(n_examples, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps)
    return max(1, math.ceil(per_epoch * cfg.num_train_epochs))


class Trainer:
    def __init__(self, model, cfg, train: list[Example], val: list[Example], pad_id: int, output_dir: Path,
                 epoch_examples=None, no_decay_names: frozenset[str] = frozenset(), generation=None):
        self.model, self.cfg, self.train_set, self.val_set = model, cfg, train, val
        self.pad_id, self.output_dir = pad_id, output_dir
        self.attn = mask_format(getattr(model.config, "_attn_implementation", None))
        self.loss_sum = LossSum(model, cfg.chunked_loss)
        self.device = pick_device()
        if not is_quantized(model):  # bitsandbytes places quantized weights itself
            self.model.to(self.device)
        self.micro_tokens = batching.micro_batch_budget(cfg.micro_batch_tokens, self.device.type)
        self.plan = batching.BatchPlan(train, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
                                       cfg.seed, cfg.group_by_length, cfg.balance_classes, epoch_examples,
                                       self.micro_tokens)
        self.no_decay = no_decay_names
        self.unfreezer = Unfreezer(model, parse_schedule(cfg.unfreeze_schedule), self.plan.per_epoch) \
            if cfg.unfreeze_schedule else None
        self.unfrozen: list[tuple] = self.unfreezer.advance(0) if self.unfreezer else []
        self.optimizer = optimizers.build_optimizer(
            model.named_parameters(), cfg.optim, cfg.learning_rate, cfg.weight_decay, cfg.loraplus_lr_ratio,
            cfg.loraplus_lr_embedding, no_decay_names)
        self.adalora = is_adalora(model)
        self.total = total_steps(cfg, len(train))
        self.watch = TrainingWatch(model, cfg, self.total, generation)  # alarms, plateau, early stopping
        self.log: MetricsLog | None = None
        self.warmup = schedule.warmup_steps(self.total, cfg.warmup_steps, cfg.warmup_ratio)
        self.state = TrainerState()
        self.bf16 = use_bf16(cfg.bf16, cfg.fp16, self.device)
        self.autocast = lambda: autocast_context(self.device, self.bf16, cfg.fp16)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.fp16 else None
        longest = max(self.plan.lengths, default=0)
        rows = cfg.per_device_train_batch_size
        if self.micro_tokens:  # the largest micro-batch after cutting
            rows = max(1, min(rows, self.micro_tokens // batching.padded_width(max(longest, 1))))
        self.checkpointing, self.checkpointing_reason = checkpointing_decision(
            cfg.gradient_checkpointing, model.config, rows, longest, cfg.memory_budget_gb)
        if self.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # --- public -----------------------------------------------------------------
    def load_state(self, path: Path) -> None:
        """Weights, optimizer, RNG and step from a checkpoint (writes nothing)."""
        if self.unfreezer:  # the checkpoint's optimizer has a group for every stage unfrozen before its step
            self._unfreeze(checkpoint.read_step(path) - 1)
        self.state = checkpoint.load_checkpoint(path, self.model, self.optimizer)
        self.watch.load_state_dict(self.state.watch)

    def _unfreeze(self, step: int, log: MetricsLog | None = None) -> None:
        """Apply schedule entries due by `step`: their new parameters join the optimizer as new groups."""
        for entry, new in self.unfreezer.advance(step):
            for group in optimizers.param_groups(new, self.cfg.weight_decay, self.cfg.loraplus_lr_ratio,
                                                 self.cfg.loraplus_lr_embedding, self.cfg.learning_rate,
                                                 self.no_decay):
                group["lr"] = self.cfg.learning_rate * group["lr_scale"]  # the schedule sets it before the step
                self.optimizer.add_param_group(group)
            self.unfrozen.append((entry, new))
            if log is not None:
                self._log_unfreeze(log, step, entry, new)

    @staticmethod
    def _log_unfreeze(log: MetricsLog, step: int, entry, new: list) -> None:
        count = sum(p.numel() for _, p in new)
        tqdm.write(f"step {step}: unfroze {entry.describe()} ({count:,} parameters)")
        log.write({"split": "unfreeze", "step": step, "unfrozen": entry.describe(), "parameters": count,
                   "tensors": len(new)})

    def fit(self) -> TrainResult:
        log = self.log = MetricsLog(self.output_dir, tensorboard=self.cfg.report_to != "none",
                                    start_step=self.state.global_step)
        if self.unfreezer and self.state.global_step == 0:  # what was unfrozen before the first step
            for entry, new in self.unfrozen:
                self._log_unfreeze(log, 0, entry, new)
        window = {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.perf_counter()}
        last_loss, eval_loss, stopped = None, None, False
        busy, trained_tokens = 0.0, 0
        bar = tqdm(total=self.total, initial=self.state.global_step, desc="training", unit="step", dynamic_ncols=True)
        try:
            while self.state.global_step < self.total and not stopped:
                started = time.perf_counter()
                if self.unfreezer:
                    self._unfreeze(self.state.global_step, log)
                loss, tokens, grad_norm = self.train_step(self.state.global_step)
                busy += time.perf_counter() - started
                trained_tokens += tokens
                self.state.global_step += 1
                window["loss"] += loss
                window["steps"] += 1
                window["tokens"] += tokens
                bar.update(1)
                step = self.state.global_step
                if step % self.cfg.logging_steps == 0 or step == self.total:
                    last_loss = self._log_train(log, window, grad_norm, bar)
                self.watch.maybe_generate(step, log)
                if self.val_set and self.cfg.eval_steps and step % self.cfg.eval_steps == 0 and step < self.total:
                    eval_loss = self._log_eval(log)
                    stopped = self.watch.after_eval(step, {"loss": eval_loss, "perplexity": perplexity(eval_loss)}, log)
                if self.watch.alarmed:
                    tqdm.write("grad_norm_alarm is 'stop': saving a checkpoint and stopping")
                    stopped = True
                if (step % self.cfg.save_steps == 0 and step < self.total and not stopped) or self.watch.alarmed:
                    self.state.watch = self.watch.state_dict()
                    checkpoint.save_checkpoint(self.output_dir, self.model, self.optimizer, self.state, self.cfg.save_total_limit)
        finally:
            bar.close()
        if self.val_set and not stopped:
            eval_loss = self._log_eval(log)
        if png := self.watch.finish(self.output_dir):
            tqdm.write(f"update heatmap: {png}")
            log.add_png("update_heatmap", png, self.state.global_step)
        log.close()
        return TrainResult(self.state.global_step, last_loss, eval_loss, stopped, busy, trained_tokens)

    def train_step(self, step: int) -> tuple[float, int, float]:
        """One optimizer step; returns (mean token loss, non-pad tokens, grad norm)."""
        cfg = self.cfg
        micro = [part for batch in self.plan.micro_batches(step)
                 for part in batching.split_by_tokens(batch, self.micro_tokens)]
        batches = [batching.collate(b, self.pad_id, self.attn) for b in micro]
        n_targets = max(1, sum(batching.count_targets(b) for b in batches))
        self.model.train()
        total_loss, tokens = 0.0, 0
        for batch in batches:
            batch = {k: v.to(self.device) for k, v in batch.items() if v is not None}
            with self.autocast():
                loss = self._loss_sum(batch) / n_targets
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total_loss += loss.item()
            tokens += int(batch["num_tokens"])
        if self.adalora:  # once per step, as PEFT adds it once per forward of a whole batch
            penalty = orthogonal_penalty(self.model)
            if torch.is_tensor(penalty):
                (self.scaler.scale(penalty) if self.scaler else penalty).backward()
        grad_norm = self._apply_update(step)
        batches = batch = None  # let the step's tensors go before trimming
        if self.device.type == "cpu":
            release_free_memory()
        return total_loss, tokens, grad_norm

    def evaluate(self) -> float:
        """Mean token loss over the validation set (train.held_out, as r1tune eval measures it)."""
        total, count = held_out_sum(self.model, self.val_set, self.pad_id, self.cfg.per_device_eval_batch_size,
                                    self.loss_sum, self.micro_tokens, self.autocast)
        return total / max(count, 1)

    # --- steps ------------------------------------------------------------------
    def _loss_sum(self, batch: dict) -> torch.Tensor:
        """Summed token loss (label smoothing while training)."""
        return self.loss_sum(batch, self.cfg.label_smoothing_factor if self.model.training else 0.0)

    def _apply_update(self, step: int) -> float:
        lr = self.cfg.learning_rate * schedule.lr_factor(step, self.total, self.warmup, self.cfg.lr_scheduler_type)
        lr *= self.watch.lr_scale
        optimizers.set_learning_rate(self.optimizer, lr)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.log is not None:  # per-layer norms after unscaling, before clipping
            self.watch.after_backward(step, self.log)
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.watch.before_update(step)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.watch.after_update(step)
        if self.adalora:
            update_ranks(self.model, step)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _log_train(self, log: MetricsLog, window: dict, grad_norm: float, bar) -> float:
        elapsed = time.perf_counter() - window["start"]
        loss = window["loss"] / max(window["steps"], 1)
        tps = window["tokens"] / max(elapsed, 1e-9)
        record = {"split": "train", "step": self.state.global_step, "loss": round(loss, 6),
                  "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": round(grad_norm, 6),
                  "tokens_per_s": round(tps, 1), "epoch": round(self._epoch(), 4), **self.watch.grad_norms()}
        log.write(record)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
        window.update(loss=0.0, steps=0, tokens=0, start=time.perf_counter())
        return loss

    def _log_eval(self, log: MetricsLog) -> float:
        loss = self.evaluate()
        ppl = perplexity(loss)
        log.write({"split": "eval", "step": self.state.global_step, "loss": round(loss, 6), "perplexity": round(ppl, 4)})
        tqdm.write(f"step {self.state.global_step}: eval loss {loss:.4f}, perplexity {ppl:.2f}")
        return loss

    def _epoch(self) -> float:
        return self.state.global_step / self.plan.per_epoch
