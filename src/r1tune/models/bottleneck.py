"""Houlsby-style bottleneck adapters: h + up(act(down(h))) after attention and/or MLP.

Placement: each adapter is a child module of the block it follows (`self_attn` / `mlp` of every
decoder layer, attribute `bottleneck_adapter`) and runs from a forward hook on that block. The
block itself is not replaced, so base state_dict keys, `isinstance` checks and transformers'
own per-module logic stay as they are; adapter keys only add `...bottleneck_adapter.*`. The hook
is a module-level function that finds the adapter on the hooked module at call time, so
deepcopy/pickle keep working and deleting the attribute turns an adapter off. Hooks run inside
the decoder layer's call, so gradient checkpointing recomputes them with the layer.

`up` starts at zero, so an adapted model first computes exactly what the base does. `down` keeps
nn.Linear's fan-in-scaled (kaiming-uniform) init rather than a fixed std 1e-2: its outputs stay
O(|h|) at any width, so `up` gets useful gradients from the first step; the zero `up` already
guarantees the identity start, so `down` need not be small.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from r1tune.errors import UserError, did_you_mean
from r1tune.fileio import atomic_path, write_text_atomic

WEIGHTS, CONFIG = "bottleneck_adapter.safetensors", "bottleneck_config.json"
ATTR = "bottleneck_adapter"
PLACES = {"attention": "self_attn", "mlp": "mlp"}  # config name -> decoder-layer submodule
WHERE = {"attention": ("attention",), "mlp": ("mlp",), "both": ("attention", "mlp")}
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@dataclass
class BottleneckConfig:
    size: int = 64
    where: str = "both"
    activation: str = "gelu"


class BottleneckAdapter(nn.Module):
    """fp32 parameters; computes in the dtype/device of its input (bf16 under autocast or a bf16 model)."""

    def __init__(self, hidden: int, size: int, activation: str, device=None):
        super().__init__()
        self.activation = activation
        self.down = nn.Linear(hidden, size, device=device, dtype=torch.float32)
        self.up = nn.Linear(size, hidden, device=device, dtype=torch.float32)
        for tensor in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(tensor)
        for module in (self, self.down, self.up):  # a later model.initialize_weights() must not redo them
            module._is_hf_initialized = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        def linear(layer, x):
            return F.linear(x, layer.weight.to(x.device, x.dtype), layer.bias.to(x.device, x.dtype))
        return h + linear(self.up, ACTIVATIONS[self.activation](linear(self.down, h)))


def _adapter_hook(module, _args, output):
    """Adapt a block's output: a tensor (mlp) or a tuple whose first item is the hidden states (self_attn)."""
    adapter = getattr(module, ATTR, None)
    if adapter is None or not isinstance(output, (tuple, torch.Tensor)):
        return output
    return (adapter(output[0]), *output[1:]) if isinstance(output, tuple) else adapter(output)


def _layers(model, strict: bool = True) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        if not strict:
            return nn.ModuleList()
        raise UserError(f"bottleneck adapters need a decoder model with `model.model.layers`, which "
                        f"{type(model).__name__} lacks; choose a Qwen2, Llama or DeepSeek-V3 style model")
    return layers


def _check(cfg: BottleneckConfig, source: str = "") -> None:
    """`source` (e.g. 'path/bottleneck_config.json: ') prefixes the message when the config came from a file."""
    if not isinstance(cfg.size, int) or cfg.size < 1:
        raise UserError(f"{source}bottleneck size must be a positive integer, got {cfg.size!r}; set e.g. 64")
    for key, value, choices in (("where", cfg.where, WHERE), ("activation", cfg.activation, ACTIVATIONS)):
        if value not in choices:
            raise UserError(f"{source}bottleneck {key} {value!r} is not one of {sorted(choices)}"
                            f"{did_you_mean(str(value), choices)}")


def _adapters(model, strict: bool = True):
    """(stable key prefix, adapter) for every attached adapter, e.g. ('layers.0.attention', module)."""
    for i, layer in enumerate(_layers(model, strict)):
        for place, attr in PLACES.items():
            adapter = getattr(getattr(layer, attr, None), ATTR, None)
            if adapter is not None:
                yield f"layers.{i}.{place}", adapter


def has_bottleneck(model) -> bool:
    return any(True for _ in _adapters(model, strict=False))


def attach_bottleneck(model, cfg: BottleneckConfig):
    """Freeze every base parameter and add trainable adapters to every decoder layer (same model object)."""
    _check(cfg)
    if has_bottleneck(model):
        raise UserError("this model already has bottleneck adapters; load the base model again before attaching")
    hidden = model.config.hidden_size
    model.requires_grad_(False)
    for layer in _layers(model):
        for place in WHERE[cfg.where]:
            block = getattr(layer, PLACES[place])
            device = next(block.parameters()).device
            block.add_module(ATTR, BottleneckAdapter(hidden, cfg.size, cfg.activation, device))
            block.register_forward_hook(_adapter_hook)
    model.bottleneck_config = cfg
    return model


def bottleneck_state(model) -> dict[str, torch.Tensor]:
    """Adapter weights only (detached, sharing storage), keyed independently of any wrapper around the
    model: 'layers.{i}.{attention|mlp}.{down|up}.{weight|bias}'."""
    return {f"{prefix}.{name}": p.detach() for prefix, adapter in _adapters(model)
            for name, p in adapter.named_parameters()}


def save_bottleneck(model, folder) -> None:
    """Write the weights, then the config; each file goes to a temp name first, then is renamed into place."""
    from safetensors.torch import save_file

    cfg = getattr(model, "bottleneck_config", None)
    if cfg is None or not has_bottleneck(model):
        raise UserError("this model has no bottleneck adapters to save; attach or load them first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to("cpu", torch.float32).contiguous() for k, v in bottleneck_state(model).items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    meta = {**asdict(cfg), "num_layers": len(_layers(model)), "hidden_size": model.config.hidden_size,
            "base_model_name_or_path": getattr(model.config, "_name_or_path", None)}
    write_text_atomic(folder / CONFIG, json.dumps(meta, indent=2) + "\n")


def _read_config(folder: Path, model) -> BottleneckConfig:
    for path in (folder, folder / CONFIG, folder / WEIGHTS):
        if not path.exists():
            raise UserError(f"{path} does not exist; point to a bottleneck adapter folder written by save_bottleneck")
    try:
        meta = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        cfg = BottleneckConfig(int(meta["size"]), meta["where"], meta["activation"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{folder / CONFIG} is not a valid bottleneck config ({exc}); save the adapter again") from exc
    _check(cfg, source=f"{folder / CONFIG}: ")
    for key, ours in (("num_layers", len(_layers(model))), ("hidden_size", model.config.hidden_size)):
        if meta.get(key) != ours:
            raise UserError(f"{folder / CONFIG} was saved for {key}={meta.get(key)} but this model has {ours}; "
                            f"load it into its base model ({meta.get('base_model_name_or_path')})")
    return cfg


def _expected_shapes(cfg: BottleneckConfig, layers: int, hidden: int) -> dict[str, tuple]:
    shapes = {"down.weight": (cfg.size, hidden), "down.bias": (cfg.size,),
              "up.weight": (hidden, cfg.size), "up.bias": (hidden,)}
    return {f"layers.{i}.{place}.{name}": shape for i in range(layers)
            for place in WHERE[cfg.where] for name, shape in shapes.items()}


def _check_weights(path: Path, saved: dict, expected: dict) -> None:
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    bad = sorted(k for k in expected.keys() & saved.keys() if tuple(saved[k].shape) != expected[k])
    if missing or unexpected or bad:
        raise UserError(f"{path} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                        f"wrong shape {bad[:3]}); save the adapter again from the trained model")


def load_bottleneck(model, folder, trainable: bool = False):
    """Attach adapters as saved in `folder` and load their weights (safetensors only, never torch.load)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = _read_config(folder, model)
    try:
        saved = load_file(str(folder / WEIGHTS), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise UserError(f"{folder / WEIGHTS} cannot be read as safetensors ({exc}); save the adapter again") from exc
    _check_weights(folder / WEIGHTS, saved, _expected_shapes(cfg, len(_layers(model)), model.config.hidden_size))
    attach_bottleneck(model, cfg)  # only once everything checked out: a failed load leaves the model untouched
    with torch.no_grad():
        for key, param in bottleneck_state(model).items():
            param.copy_(saved[key])
    for _, adapter in _adapters(model):
        adapter.requires_grad_(trainable)
    return model


def merge_bottleneck(model):
    raise UserError("bottleneck adapters add a nonlinear block and cannot be merged into the base weights; "
                    "serve the base model together with the adapter folder instead")
