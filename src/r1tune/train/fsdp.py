"""FSDP: the decoder's weights, gradients and optimizer state sharded over the processes (torch's FSDP2,
`fully_shard`), configured with Hugging Face TrainingArguments' `fsdp` / `fsdp_config` keys.

    fsdp: full_shard auto_wrap          # ZeRO-3 style: layers gathered for each forward and backward
    fsdp: shard_grad_op auto_wrap       # ZeRO-2 style: gathered weights kept from forward to backward
    fsdp_config: {transformer_layer_cls_to_wrap: [Qwen2DecoderLayer], offload_params: true}

Each decoder layer is one FSDP unit (by default the classes the model names in _no_split_modules) and the
decoder (embeddings, final norm) is the root unit. The output head stays whole on every process: the stages
score the decoder's hidden states through it in chunks (never the full logits), which needs its weight
outside any forward call; its gradient, when it trains, is summed like DDP's (r1tune.train.distributed).
Every process must run the same forwards (each gathers the layers from all), so the engine gives every
process the same number of micro-batches per step, and stages whose forwards differ per process (GRPO's
sampled rollouts) refuse FSDP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from r1tune.errors import UserError

OPTIONS = {"full_shard", "shard_grad_op", "auto_wrap", "offload", "hybrid_shard", "no_shard"}
CONFIG_KEYS = {"fsdp_version", "transformer_layer_cls_to_wrap", "reshard_after_forward", "offload_params",
               "min_num_params", "backward_prefetch", "forward_prefetch", "sync_module_states", "use_orig_params",
               "cpu_ram_efficient_loading", "activation_checkpointing", "limit_all_gathers", "state_dict_type",
               "xla", "xla_fsdp_v2", "xla_fsdp_grad_ckpt", "auto_wrap_policy"}


@dataclass
class FsdpPlan:
    reshard_after_forward: bool  # full_shard (True) or shard_grad_op (False)
    offload: bool  # parameters, gradients and optimizer state on the CPU between uses
    layer_classes: list[str]  # decoder layer class names to wrap (empty: the model's _no_split_modules)


def plan_of(fsdp, fsdp_config, source: str) -> FsdpPlan | None:
    """The FSDP plan from the run file's keys (None: no FSDP)."""
    if not fsdp:
        return None
    options = fsdp.split() if isinstance(fsdp, str) else list(fsdp)
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise UserError(f"{source}: config key 'fsdp': unknown option '{unknown[0]}'; use full_shard or shard_grad_op, "
                        "optionally with auto_wrap and offload (e.g. 'full_shard auto_wrap')")
    if "hybrid_shard" in options or "no_shard" in options:
        raise UserError(f"{source}: config key 'fsdp': hybrid_shard and no_shard are not supported; use full_shard or "
                        "shard_grad_op (or omit fsdp for plain data parallelism)")
    if "full_shard" in options and "shard_grad_op" in options:
        raise UserError(f"{source}: config key 'fsdp': choose one of full_shard and shard_grad_op")
    config = _read_config(fsdp_config, source)
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise UserError(f"{source}: config key 'fsdp_config': unknown key '{unknown[0]}'; known: "
                        f"{', '.join(sorted(CONFIG_KEYS))}")
    if str(config.get("fsdp_version", 2)) != "2":
        raise UserError(f"{source}: config key 'fsdp_config': fsdp_version {config['fsdp_version']} is not supported; "
                        "r1tune uses FSDP2 (fully_shard): set fsdp_version: 2 or remove it")
    reshard = config.get("reshard_after_forward", "shard_grad_op" not in options)
    if isinstance(reshard, str):  # accelerate's spelling: FULL_SHARD / SHARD_GRAD_OP
        reshard = reshard.upper() != "SHARD_GRAD_OP"
    layers = config.get("transformer_layer_cls_to_wrap") or []
    layers = [layers] if isinstance(layers, str) else list(layers)
    offload = "offload" in options or _true(config.get("offload_params", False))
    return FsdpPlan(bool(reshard), offload, [c.strip() for name in layers for c in name.split(",") if c.strip()])


def _true(value) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes")


def _read_config(value, source: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {k.removeprefix("fsdp_") if k != "fsdp_version" else k: v for k, v in value.items()}
    path = Path(value)
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{source}: config key 'fsdp_config': cannot read '{value}' ({exc.strerror})") from None
    except ValueError as exc:
        raise UserError(f"{source}: config key 'fsdp_config': '{value}' is not valid JSON ({exc})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{source}: config key 'fsdp_config': '{value}' must hold a JSON object")
    return _read_config(loaded, source)


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body (embeddings, layers, final norm) under a PEFT wrapper and a causal-LM head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", None)
    if decoder is None or not hasattr(decoder, "layers"):
        raise UserError(f"fsdp: {type(base).__name__} has no decoder with .layers to shard; train it without fsdp")
    return decoder


def shard(model: nn.Module, plan: FsdpPlan) -> int:
    """Apply fully_shard to each decoder layer and to the decoder (in place); the number of layer units."""
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    except ImportError:
        raise UserError(f"fsdp needs torch >= 2.6 (FSDP2's fully_shard); this is torch {torch.__version__}") from None
    decoder = decoder_of(model)
    names = plan.layer_classes or list(getattr(model, "_no_split_modules", None) or
                                       getattr(decoder, "_no_split_modules", None) or [])
    layers = [m for m in decoder.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"fsdp: no module of class {', '.join(names) or '(none named)'} in the model; set "
                        f"fsdp_config.transformer_layer_cls_to_wrap to the decoder layer class "
                        f"(here {type(decoder.layers[0]).__name__})")
    extra = {"offload_policy": CPUOffloadPolicy()} if plan.offload else {}
    for layer in layers:
        fully_shard(layer, reshard_after_forward=plan.reshard_after_forward, **extra)
    fully_shard(decoder, reshard_after_forward=plan.reshard_after_forward, **extra)
    for unit in sharded_units(model):  # sum, not average: each rank's loss is already over the global units
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no pre-multiplied sum)
    return len(layers)


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP manages the model (its parameters may be gathered right now: shard_grad_op after a forward)."""
    return bool(sharded_units(model))


def sharded_units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Whether the next backward reduce-scatters the sharded gradients (only the step's last one does)."""
    for unit in sharded_units(model):
        unit.set_requires_gradient_sync(sync, recurse=False)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A reduced value computed from shards (a DTensor, e.g. a norm) as a plain tensor; collective under FSDP."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def whole_params(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters FSDP does not shard (summed over the processes like DDP's)."""
    from torch.distributed.tensor import DTensor

    return [p for p in params if not isinstance(p, DTensor)]


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ over sharded and whole gradients together: the norm of all of them."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    squares = torch.zeros((), dtype=torch.float64)
    if sharded:
        squares += torch.nn.utils.get_total_norm(sharded, 2.0).full_tensor().double().cpu() ** 2
    if whole:
        squares += torch.nn.utils.get_total_norm(whole, 2.0).double().cpu() ** 2
    norm = squares.sqrt().float()
    if max_norm < float("inf"):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device))
    return float(norm)


def full_state(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded state dict on the main process (CPU tensors; empty elsewhere). Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    for unit in sharded_units(model):  # shard_grad_op leaves weights gathered after a forward without backward
        unit.reshard()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainable_only:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in names}
    # on a CPU run the "offloaded" tensors can share storage with gathered weights FSDP frees again
    return {k: v.clone() for k, v in state.items()}


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer state keyed by parameter names, unsharded, on the main process. Every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Unsharded weights (trainable ones) and name-keyed optimizer state, each process taking its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
