"""Device and precision choices shared by every stage."""

from __future__ import annotations

import contextlib

import torch

from r1tune.errors import UserError


def pick_device() -> torch.device:
    """The GPU this process was given (one per rank under several processes), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


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
