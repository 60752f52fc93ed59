"""The training loop every stage shares: micro-batches, precision, clipping, schedule, evaluation,
checkpoints, logging and progress. A stage brings its loss (r1tune.train.stage_loss) and a list of
callbacks (r1tune.train.callbacks); the loop knows nothing of what it trains.

One optimizer step consumes `gradient_accumulation_steps` batches, each cut into micro-batches of
at most `micro_batch_tokens` padded tokens; each micro-batch's summed loss is divided by the units
(target tokens, pairs) of the whole step, so the step's gradient is that of the mean over all of
them however they fall into micro-batches.

Under several processes (r1tune.train.distributed) every rank runs the same loop on its share of
each step's examples; the units, the logged loss and statistics are summed over the ranks and the
gradients summed once per step, so N processes take the same steps as one process with the same
global batch (per_device_train_batch_size x gradient_accumulation_steps x processes). Only the main
process writes files and prints (r1tune.process).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from r1tune.models.quantize import is_quantized
from r1tune.process import is_main
from r1tune.stages import stage_data
from r1tune.train import batching, checkpoint, distributed, fsdp, optimizers, schedule, zero
from r1tune.train.callbacks import Callback, Callbacks
from r1tune.train.checkpoint import TrainerState
from r1tune.train.logs import MetricsLog
from r1tune.train.memory import checkpointing_decision, release_free_memory
from r1tune.train.precision import autocast_context, pick_device, use_bf16
from r1tune.train.stage_loss import StageLoss, add_stats
from r1tune.ui import say


@dataclass
class TrainResult:
    global_step: int
    last_loss: float | None
    eval_loss: float | None
    stopped_early: bool
    train_runtime: float = 0.0  # seconds in the training loop (evaluation excluded)
    train_tokens: int = 0  # non-padding tokens trained on
    model: object = field(default=None, repr=False)  # the trained model, for callers that go on using it
    eval_metrics: dict = field(default_factory=dict)  # the last evaluation's metrics


@dataclass
class Stop:
    reason: str
    checkpoint: bool  # save a checkpoint at the step that stopped


def examples_per_batch(cfg) -> int:
    """per_device_train_batch_size counts completions for a stage that generates them (GRPO, as in TRL):
    its batch is that many / num_generations prompts."""
    if stage_data(cfg.stage).generates:
        return max(1, cfg.per_device_train_batch_size // cfg.num_generations)
    return cfg.per_device_train_batch_size


def steps_per_batch(cfg) -> int:
    """Optimizer steps each batch serves: GRPO's num_iterations, else 1."""
    return cfg.num_iterations if stage_data(cfg.stage).generates else 1


def global_batch(cfg) -> int:
    """Examples per batch over all processes (per_device_train_batch_size's share x processes)."""
    return examples_per_batch(cfg) * distributed.world_size()


def total_steps(cfg, n_examples: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = batching.steps_per_epoch(n_examples, global_batch(cfg), cfg.gradient_accumulation_steps)
    return max(1, math.ceil(per_epoch * steps_per_batch(cfg) * cfg.num_train_epochs))


class Engine:
    def __init__(self, model, cfg, stage: StageLoss, train: list, val: list, output_dir: Path,
                 callbacks: list[Callback] = (), epoch_examples=None, no_decay: frozenset[str] = frozenset()):
        self.model, self.cfg, self.stage, self.train_set, self.val_set = model, cfg, stage, train, val
        self.output_dir, self.no_decay = output_dir, no_decay
        self.writes = is_main()
        self.device = pick_device()
        if not is_quantized(model):  # bitsandbytes places quantized weights itself
            self.model.to(self.device)
        self.micro_tokens = batching.micro_batch_budget(cfg.micro_batch_tokens, self.device.type, model.config)
        self.repeats = steps_per_batch(cfg)
        self.world = distributed.world_size()
        self.plan = batching.BatchPlan(train, global_batch(cfg), cfg.gradient_accumulation_steps,
                                       cfg.seed, cfg.group_by_length, cfg.balance_classes, epoch_examples,
                                       self.micro_tokens, stage.lengths(train))
        self.total = total_steps(cfg, len(train))
        self.callbacks = Callbacks(callbacks)
        self.callbacks.setup(self)  # may change what trains, so before the optimizer sees the parameters
        distributed.broadcast_trainable(model)
        self.bf16 = use_bf16(cfg.bf16, cfg.fp16, self.device)
        self.fsdp = fsdp.plan_of(cfg.fsdp, cfg.fsdp_config, cfg.source) if self.world > 1 else None
        if self.fsdp:
            fsdp.shard(model, self.fsdp)
        self.optimizer = optimizers.build_optimizer(
            model.named_parameters(), cfg.optim, cfg.learning_rate, cfg.weight_decay, cfg.loraplus_lr_ratio,
            cfg.loraplus_lr_embedding, no_decay)
        self.ds = None  # DeepSpeed's engine around the model when the run file names a deepspeed config
        if (ds_config := zero.read_config(cfg.deepspeed, cfg.source)) is not None:
            ds_config = zero.fill_auto(ds_config, cfg, self.world, examples_per_batch(cfg), model.config.hidden_size,
                                       self.bf16)
            self.ds, self.optimizer = zero.initialize(model, self.optimizer, ds_config)
        self.warmup = schedule.warmup_steps(self.total, cfg.warmup_steps, cfg.warmup_ratio)
        self.state = TrainerState()
        self.log: MetricsLog | None = None
        self.stop: Stop | None = None
        self.autocast = lambda: autocast_context(self.device, self.bf16, cfg.fp16)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.fp16 and self.ds is None else None  # DeepSpeed scales fp16
        self.checkpointing, self.checkpointing_reason = self._checkpointing()

    def _checkpointing(self) -> tuple[bool, str]:
        longest = max(self.plan.lengths, default=0)
        rows = self.cfg.per_device_train_batch_size
        if self.micro_tokens:  # the largest micro-batch after cutting
            rows = max(1, min(rows, self.micro_tokens // batching.padded_width(max(longest, 1))))
        decision = checkpointing_decision(self.cfg.gradient_checkpointing, self.model.config, rows, longest,
                                          self.cfg.memory_budget_gb)
        if decision[0]:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return decision

    # --- public -----------------------------------------------------------------
    def load_state(self, path: Path) -> None:
        """Weights, optimizer, RNG, step and callback state from a checkpoint (writes nothing)."""
        self.callbacks.on_resume(self, checkpoint.read_step(path))
        self.state = checkpoint.load_checkpoint(path, self.model, self.optimizer, self.ds)
        self.callbacks.load_state_dict(self.state.watch)

    def request_stop(self, reason: str, checkpoint: bool = False) -> None:
        """End the run after this step (a callback's call); `checkpoint` saves the step first."""
        say(reason)
        self.stop = Stop(reason, checkpoint or bool(self.stop and self.stop.checkpoint))

    def backward(self, loss: torch.Tensor) -> None:
        if self.ds is not None:  # DeepSpeed averages the processes' gradients; r1tune's losses are parts of a sum
            self.ds.backward(loss * self.world, scale_wrt_gas=False)
            return
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def fit(self) -> TrainResult:
        self.log = MetricsLog(self.output_dir, tensorboard=self.cfg.report_to != "none",
                              start_step=self.state.global_step, enabled=self.writes)
        self.callbacks.on_train_begin(self)
        window = _Window()
        last_loss, metrics, busy, trained_tokens = None, {}, 0.0, 0
        bar = tqdm(total=self.total, initial=self.state.global_step, desc="training", unit="step",
                   dynamic_ncols=True, disable=None if self.writes else True)
        try:
            while self.state.global_step < self.total and self.stop is None:
                started = time.perf_counter()
                self.callbacks.on_step_begin(self, self.state.global_step)
                loss, tokens, grad_norm, stats = self.train_step(self.state.global_step)
                busy += time.perf_counter() - started
                trained_tokens += tokens
                self.state.global_step += 1
                window.add(loss, tokens, stats)
                bar.update(1)
                step = self.state.global_step
                if step % self.cfg.logging_steps == 0 or step == self.total:
                    last_loss = self._log_train(window, grad_norm, bar)
                self.callbacks.on_step_end(self, step)
                self._agree_on_stop()
                if self.val_set and self.cfg.eval_steps and step % self.cfg.eval_steps == 0 and step < self.total:
                    metrics = self._log_eval()
                    self.callbacks.on_evaluate(self, step, metrics)
                due = step % self.cfg.save_steps == 0 and step < self.total and self.stop is None
                if due or (self.stop and self.stop.checkpoint):
                    self.save_checkpoint()
        finally:
            bar.close()
        if self.val_set and self.stop is None:
            metrics = self._log_eval()
        self.callbacks.on_train_end(self)
        self.log.close()
        return TrainResult(self.state.global_step, last_loss, metrics.get("loss"), self.stop is not None, busy,
                           trained_tokens, eval_metrics=metrics)

    def _agree_on_stop(self) -> None:
        """A stop requested on any rank (a guard reading its share of the rollouts) stops every rank at this step."""
        if self.world == 1:
            return
        stops = [s for s in distributed.gather_objects(self.stop and (self.stop.reason, self.stop.checkpoint)) if s]
        if not stops:
            return
        if self.stop is None:
            say(stops[0][0])
        self.stop = Stop(self.stop.reason if self.stop else stops[0][0], any(checkpoint for _, checkpoint in stops))

    def save_checkpoint(self) -> None:
        self.state.watch = self.callbacks.state_dict()
        self.state.processes = self.world
        if self.ds is not None:
            self._save_deepspeed_checkpoint()
            return
        if self.fsdp:  # gathered from every rank onto the main one
            weights = fsdp.full_state(self.model, trainable_only=True)
            named = fsdp.full_optimizer_state(self.model, self.optimizer)
            optimizer_state = checkpoint.by_index(named, checkpoint.param_names(self.model, self.optimizer)) \
                if self.writes else None
        elif self.writes:
            weights, optimizer_state = checkpoint.trainable_weights(self.model), self.optimizer.state_dict()
        if self.writes:
            checkpoint.save_checkpoint(self.output_dir, weights, optimizer_state, self.state,
                                       self.cfg.save_total_limit)

    def _save_deepspeed_checkpoint(self) -> None:
        """Every rank writes its partitions (DeepSpeed's files); the main one moves them into the checkpoint."""
        staging = self.output_dir / f".deepspeed-{self.state.global_step}"
        self.ds.save_checkpoint(str(staging), tag=checkpoint.DEEPSPEED_DIR, save_latest=False)
        distributed.barrier()
        if self.writes:
            checkpoint.save_checkpoint(self.output_dir, None, staging / checkpoint.DEEPSPEED_DIR, self.state,
                                       self.cfg.save_total_limit)
            shutil.rmtree(staging, ignore_errors=True)

    def train_step(self, step: int) -> tuple[float, int, float, dict]:
        """One optimizer step; returns (mean loss, non-pad tokens, grad norm, the stage's statistics), each over
        all ranks."""
        batches, weights, stats = self._step_batches(step)
        n_units = max(1, distributed.sum_floats([sum(self.stage.units(b) for b, w in zip(batches, weights) if w)])[0])
        self.model.train()
        total_loss, tokens = 0.0, 0
        for i, (batch, weight) in enumerate(zip(batches, weights)):
            self._mark_last_backward(i == len(batches) - 1)
            batch = {k: v.to(self.device) for k, v in batch.items() if v is not None}
            with self.autocast():
                loss_sum, batch_stats = self.stage.loss(self.model, batch)
                loss = loss_sum * weight / n_units
            self.backward(loss)
            if weight:
                total_loss += loss.item()
                tokens += int(batch["num_tokens"])
                add_stats(stats, batch_stats)
        if self.world > 1:
            self._sum_gradients()
            total_loss, tokens, stats = self._summed(total_loss, tokens, stats)
        self.callbacks.on_backward_end(self, step)
        grad_norm = self._apply_update(step)
        batches = batch = None  # let the step's tensors go before trimming
        if self.device.type == "cpu":
            release_free_memory()
        return total_loss, tokens, grad_norm, stats

    def _step_batches(self, step: int) -> tuple[list[dict], list[float], dict]:
        """This rank's collated micro-batches of the step, their loss weights (0: a filler) and the stage's
        statistics. Sharded weights make every forward and backward collective, so then every rank runs as many
        micro-batches as the busiest one, the others adding zero-weight fillers."""
        whole = self.plan.micro_batches(step // self.repeats)
        shares = [part for batch in whole if (part := distributed.share(batch))]
        step_batches, stats = self.stage.begin_step(self, step, shares)
        batches = [self.stage.collate(part) for batch in step_batches
                   for part in self.stage.split(batch, self.micro_tokens)]
        weights = [1.0] * len(batches)
        if self.fsdp or self.ds:
            fillers = distributed.max_int(len(batches)) - len(batches)
            batches += [self.stage.filler(whole[0][0])] * fillers
            weights += [0.0] * fillers
        return batches, weights, stats

    def _mark_last_backward(self, last: bool) -> None:
        """FSDP and DeepSpeed reduce the gradients over the ranks in the step's last backward only."""
        if self.fsdp:
            fsdp.set_gradient_sync(self.model, last)
        if self.ds is not None:
            self.ds.set_gradient_accumulation_boundary(last)

    def _sum_gradients(self) -> None:
        """Plain data parallelism: every gradient; FSDP: the whole (unsharded) ones; DeepSpeed: none (it sums)."""
        if self.ds is not None:
            return
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        distributed.sum_gradients(fsdp.whole_params(trainable) if self.fsdp else trainable)

    @staticmethod
    def _summed(loss: float, tokens: int, stats: dict) -> tuple[float, int, dict]:
        """The step's loss, tokens and statistics over all ranks."""
        loss, tokens = distributed.sum_floats([loss, tokens])
        merged: dict = {}
        for part in distributed.gather_objects(stats):
            add_stats(merged, part)
        return loss, int(tokens), merged

    def evaluate(self) -> dict:
        """The stage's held-out metrics on the validation set ('loss' among them)."""
        return self.stage.evaluate(self.model, self.val_set, self.cfg.per_device_eval_batch_size, self.micro_tokens,
                                   self.autocast)

    # --- steps ------------------------------------------------------------------
    def _apply_update(self, step: int) -> float:
        lr = self.cfg.learning_rate * schedule.lr_factor(step, self.total, self.warmup, self.cfg.lr_scheduler_type)
        optimizers.set_learning_rate(self.optimizer, lr * self.callbacks.lr_scale)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.log is not None:  # per-layer norms after unscaling, before clipping
            self.callbacks.on_gradients(self, step)
        if self.ds is not None:  # DeepSpeed reduces, clips (gradient_clipping), steps and zeroes
            self.callbacks.before_update(self, step)
            self.ds.step()
            self.callbacks.after_update(self, step)
            return float(self.ds.get_global_grad_norm() or 0.0)
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        if self.fsdp:
            grad_norm = fsdp.clip_gradients(params, max_norm)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.callbacks.before_update(self, step)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.callbacks.after_update(self, step)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _log_train(self, window: "_Window", grad_norm: float, bar) -> float:
        loss, tps = window.mean_loss(), window.tokens_per_s()
        record = {"split": "train", "step": self.state.global_step, "loss": round(loss, 6),
                  "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": round(grad_norm, 6),
                  "tokens_per_s": round(tps, 1), "epoch": round(self._epoch(), 4), **window.means()}
        self.callbacks.on_log(self, record)
        self.log.write(record)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
        window.reset()
        return loss

    def _log_eval(self) -> dict:
        metrics = self.evaluate()
        self.log.write({"split": "eval", "step": self.state.global_step,
                        **{k: round(v, 6 if k == "loss" else 4) for k, v in metrics.items()}})
        say(f"step {self.state.global_step}: {self.stage.describe(metrics)}")
        return metrics

    def _epoch(self) -> float:
        return self.state.global_step / (self.plan.per_epoch * self.repeats)


class _Window:
    """What the train log averages between two log records."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.tokens, self.stats = 0.0, 0, 0, {}
        self.start = time.perf_counter()

    def add(self, loss: float, tokens: int, stats: dict) -> None:
        self.loss += loss
        self.steps += 1
        self.tokens += tokens
        add_stats(self.stats, stats)

    def mean_loss(self) -> float:
        return self.loss / max(self.steps, 1)

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def means(self) -> dict:
        return {name: round(value / count, 6) for name, (value, count) in self.stats.items() if count}
