"""DeepSpeed ZeRO (stage 0, 2, 3, with CPU offload) under r1tune's loop, from the `deepspeed` key: a JSON file
(LLaMA-Factory's examples/deepspeed/ds_z*_config.json work unchanged; copies in examples/distributed/) or a mapping.

"auto" values are filled from the run file as Hugging Face's Trainer fills them (train_micro_batch_size_per_gpu,
gradient_accumulation_steps, train_batch_size, gradient_clipping, fp16/bf16, and the bucket sizes from the
model's hidden size); a value that is not "auto" must agree with the run file. r1tune keeps its own optimizer
(`optim`), learning-rate schedule and micro-batching: the config may not carry `optimizer` or `scheduler`
sections. DeepSpeed partitions that optimizer's state (stage 1-2), the gradients (2) and the weights (3), sums the
gradients over the processes at the step's last micro-batch (r1tune marks it), clips them and steps.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from r1tune.errors import UserError

OFFLOAD_KEYS = ("offload_optimizer", "offload_param")


def read_config(value, source: str) -> dict | None:
    """The `deepspeed` key's mapping (None: not set)."""
    if value in (None, ""):
        return None
    if isinstance(value, dict):
        config = copy.deepcopy(value)
    else:
        path = Path(str(value))
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UserError(f"{source}: config key 'deepspeed': cannot read '{value}' ({exc.strerror}); give a "
                            "DeepSpeed JSON file (e.g. examples/distributed/ds_z3_config.json)") from None
        except ValueError as exc:
            raise UserError(f"{source}: config key 'deepspeed': '{value}' is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"{source}: config key 'deepspeed' must be a JSON object (a file or a mapping)")
    for section in ("optimizer", "scheduler"):
        if section in config:
            key = "optim" if section == "optimizer" else "lr_scheduler_type"
            raise UserError(f"{source}: the deepspeed config has a '{section}' section; r1tune builds the {section} "
                            f"from '{key}' (and learning_rate) itself: remove the section")
    return config


def stage_of(config: dict | None) -> int | None:
    if config is None:
        return None
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def fill_auto(config: dict, cfg, world: int, per_device: int, hidden_size: int, bf16: bool) -> dict:
    """`config` with every "auto" filled from the run; UserError for a set value that contradicts the run file."""
    config = copy.deepcopy(config)
    source = cfg.source
    accumulation = cfg.gradient_accumulation_steps

    def match(section: dict, key: str, value, run_key: str) -> None:
        given = section.get(key, "auto")
        if given == "auto":
            section[key] = value
        elif given != value:
            raise UserError(f"{source}: deepspeed config '{key}' is {given} but the run file gives {value} "
                            f"({run_key}); set it to \"auto\" or make them agree")

    match(config, "train_micro_batch_size_per_gpu", per_device, "per_device_train_batch_size")
    match(config, "gradient_accumulation_steps", accumulation, "gradient_accumulation_steps")
    match(config, "train_batch_size", per_device * accumulation * world,
          "per_device_train_batch_size x gradient_accumulation_steps x processes")
    match(config, "gradient_clipping", float(cfg.max_grad_norm), "max_grad_norm")
    for name, on in (("fp16", cfg.fp16), ("bf16", bf16)):
        if isinstance(config.get(name), dict):
            match(config[name], "enabled", bool(on), name)
    zero = config.setdefault("zero_optimization", {})
    fills = {"reduce_bucket_size": hidden_size * hidden_size}
    if stage_of(config) == 3:
        fills.update(stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
                     stage3_param_persistence_threshold=10 * hidden_size)
    for key, value in fills.items():
        if zero.get(key) == "auto":
            zero[key] = value
    left = [k for k, v in _flat(config) if v == "auto"]
    if left:
        raise UserError(f"{source}: deepspeed config key '{left[0]}' is \"auto\", which r1tune cannot fill; give a value")
    config["zero_allow_untested_optimizer"] = True  # r1tune's own optimizer (optim)
    if any(k in zero for k in OFFLOAD_KEYS):
        # the optimizer steps on the CPU copies: torch's own AdamW there, instead of DeepSpeedCPUAdam, which
        # needs a C++ compiler and minutes of building at first use
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    config.setdefault("steps_per_print", 10**9)  # r1tune logs
    return config


def _flat(config: dict, prefix: str = ""):
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flat(value, name + ".")
        else:
            yield name, value


def initialize(model, optimizer, config: dict):
    """DeepSpeed's engine around the model (the same module object) and r1tune's optimizer."""
    try:
        import deepspeed
    except ImportError:
        raise UserError("config key 'deepspeed' needs DeepSpeed: pip install deepspeed (DS_BUILD_OPS=0 installs it "
                        "without compiling; docs/distributed.md)") from None
    _skip_cpu_shared_memory_op(deepspeed)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                      dist_init_required=False)
    return engine, ds_optimizer


def _skip_cpu_shared_memory_op(deepspeed) -> None:
    """On CPU, DeepSpeed builds a shared-memory all-reduce op with the C++ compiler at its first use (minutes,
    and it fails without a compiler); r1tune's gloo process group does the same sums."""
    if torch.cuda.is_available():
        return
    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(ops, dict):
        ops["deepspeed_shm_comm"] = False


def whole_state(engine) -> dict | None:
    """ZeRO-3: the unpartitioned state dict on the main process (every process must call it); else None."""
    if engine is None or engine.zero_optimization_stage() != 3:
        return None
    return engine._zero3_consolidated_16bit_state_dict()
