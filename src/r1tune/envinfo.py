"""`r1tune env`: versions, devices, bf16 support and optional features."""

from __future__ import annotations

import importlib.metadata as md
import platform
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "tokenizers", "safetensors", "datasets")
OPTIONAL = {"tensorboard": "TensorBoard event files", "matplotlib": "loss plots",
            "trl": "preference/RL stages (later)", "bitsandbytes": "QLoRA, 8-bit optimizers (CPU >= 0.49, CUDA)",
            "flash_attn": "flash-attention 2 (CUDA)", "deepspeed": "DeepSpeed ZeRO"}


def version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


def cpu_bf16() -> bool:
    """AVX-512 BF16 or AMX on x86 (fast bf16 matmuls on CPU)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def collect() -> list[tuple[str, str]]:
    import torch

    rows = [("python", platform.python_version()), ("platform", platform.platform())]
    rows += [(name, version(name)) for name in PACKAGES]
    rows.append(("cpu threads", str(torch.get_num_threads())))
    rows.append(("cpu bf16 (avx512_bf16/amx)", "yes" if cpu_bf16() else "no"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            rows.append((f"cuda:{i}", torch.cuda.get_device_name(i)))
        rows.append(("cuda bf16", "yes" if torch.cuda.is_bf16_supported() else "no"))
    else:
        rows.append(("cuda", "not available"))
    for name, use in OPTIONAL.items():
        rows.append((f"extra: {name}", f"{version(name.replace('_', '-'))} — {use}"))
    return rows
