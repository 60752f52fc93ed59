"""Optimizer factory: the `optim` names users know from HF/LLaMA-Factory, mapped to a few implementations.

Choices:
- Every param group carries `lr_scale`; the trainer's schedule calls `set_learning_rate(opt, lr)` each step,
  which keeps LoRA+ ratios (and the embedding lr) proportional to the schedule.
- Weight decay only on 2-D+ tensors (not biases/norms), never on names in `no_decay_names`: decoupled decay
  would shrink parameters whose gradient is masked (e.g. frozen experts inside a fused MoE tensor).
- Lion is implemented here (a dozen lines) so it needs no extra package; bitsandbytes is imported lazily
  because it is optional and its native library may fail to load.
- "paged_*" names map to the non-paged 8-bit optimizers: paging only helps under CUDA memory pressure.
- Adafactor gets eps=(None, 1.0): torch scales its step by max(eps2, RMS(param)), so with the default eps2=1e-3
  a zero-initialised LoRA B would move 1000x slower than lr; eps2=1 makes lr the absolute step size, as in the
  HF Trainer's adafactor (scale_parameter=False, relative_step=False).
All state is tensors/ints/floats, so checkpoints load with torch.load(weights_only=True).
"""

import torch

from r1tune.config import OPTIMIZERS
from r1tune.errors import UserError, did_you_mean


def canonical_optim(name: str, source: str = "config") -> str:
    """The canonical optimizer for an `optim` value; UserError naming the choices otherwise."""
    key = str(name).strip().lower()
    if key in OPTIMIZERS:
        return OPTIMIZERS[key]
    choices = ", ".join(OPTIMIZERS)
    raise UserError(f"{source}: 'optim' must be one of {choices}, got {name!r}{did_you_mean(key, OPTIMIZERS)}")


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): signed momentum updates.

    Every coordinate moves by exactly lr per step, so use an lr 3-10x smaller than for AdamW
    (and a weight_decay 3-10x larger to keep lr * weight_decay the same).
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m.lerp(p.grad, 1 - beta1)), alpha=-group["lr"])  # sign(b1*m + (1-b1)*g)
                m.lerp_(p.grad, 1 - beta2)
        return loss


def _lr_scale(name: str, ratio: float | None, lr_embedding: float, base_lr: float) -> float:
    if ratio is None:
        return 1.0
    if "lora_embedding_B" in name:
        return lr_embedding / base_lr  # absolute lr at the peak of the schedule
    return ratio if "lora_B" in name else 1.0


def param_groups(named_params, weight_decay: float, loraplus_lr_ratio: float | None = None,
                 loraplus_lr_embedding: float = 1e-6, base_lr: float = 1.0,
                 no_decay_names: set[str] = frozenset()) -> list[dict]:
    """Trainable params grouped by (weight decay, lr_scale); each group's lr is base_lr * lr_scale."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        decay = weight_decay if p.ndim >= 2 and name not in no_decay_names else 0.0
        scale = _lr_scale(name, loraplus_lr_ratio, loraplus_lr_embedding, base_lr)
        groups.setdefault((decay, scale), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_scale": s, "lr": base_lr * s} for (wd, s), ps in groups.items()]


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply a scheduled lr to every group, keeping each group's ratio."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _fused_adamw(groups, lr):
    # torch only checks devices at the first step(); check here so the error names the config fix
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    devices = _get_fused_kernels_supported_devices()
    for p in (p for g in groups for p in g["params"]):
        if p.device.type not in devices or not p.is_floating_point():
            raise UserError(f"optim: adamw_torch_fused has no fused kernel for {p.dtype} parameters on "
                            f"{p.device.type}; use optim: adamw_torch")
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def _bnb(kind: str):
    try:
        import bitsandbytes.optim as bnb_optim
    except Exception as exc:  # missing, or its native library failed to load
        raise UserError(f"optim: {kind} needs bitsandbytes (`pip install bitsandbytes`), which failed to import "
                        f"({type(exc).__name__}: {exc}); install it or use optim: adamw_torch") from exc
    return bnb_optim


_FACTORIES = {
    "adamw": lambda groups, lr: torch.optim.AdamW(groups, lr=lr),
    "adamw_fused": _fused_adamw,
    "lion": lambda groups, lr: Lion(groups, lr=lr),
    "adamw_8bit": lambda groups, lr: _bnb("adamw_8bit").AdamW8bit(groups, lr=lr),
    "lion_8bit": lambda groups, lr: _bnb("lion_8bit").Lion8bit(groups, lr=lr),
    "adafactor": lambda groups, lr: torch.optim.Adafactor(groups, lr=lr, eps=(None, 1.0)),
}


def build_optimizer(named_params, optim: str, lr: float, weight_decay: float,
                    loraplus_lr_ratio: float | None = None, loraplus_lr_embedding: float = 1e-6,
                    no_decay_names: set[str] = frozenset()) -> torch.optim.Optimizer:
    """The optimizer named by `optim` over the trainable params, grouped for decay and LoRA+."""
    kind = canonical_optim(optim)
    groups = param_groups(named_params, weight_decay, loraplus_lr_ratio, loraplus_lr_embedding, lr, no_decay_names)
    if not groups:
        raise UserError("no parameter is trainable, so the optimizer has nothing to update")
    return _FACTORIES[kind](groups, lr)
