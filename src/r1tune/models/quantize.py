"""QLoRA base weights: 4-bit (nf4/fp4, double quantisation) or 8-bit linear layers via bitsandbytes.

bitsandbytes >= 0.49 quantizes and runs 4-bit and 8-bit layers on CPU as well as CUDA,
so QLoRA trains here (slowly: 8-bit matmuls go through float16, which this kind of CPU
runs at a few GFLOP/s). Only nn.Linear layers are quantized: DeepSeek-V3's fused routed
experts are 3-D parameters and stay in the load dtype, as does the output head.
"""

from __future__ import annotations

import torch

from r1tune.envinfo import CPU_4BIT_BLOCKSIZE, CPU_4BIT_ROWS  # bitsandbytes' CPU 4-bit layout (see there)
from r1tune.errors import UserError


def require_bitsandbytes(key: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        raise UserError(f"config key '{key}' needs bitsandbytes, which is not usable here ({type(exc).__name__}); "
                        "install it with `pip install bitsandbytes` (>= 0.49 for CPU) or remove the key") from None


def quantization_config(bits: int | None, quant_type: str = "nf4", double: bool = True,
                        compute_dtype: torch.dtype = torch.float32, skip_modules: list[str] | None = None):
    """transformers' BitsAndBytesConfig for `bits`, or None when the base is not quantized.

    `skip_modules` replaces transformers' default list (the output head), so include it there."""
    if bits is None:
        return None
    require_bitsandbytes("quantization_bit")
    from transformers import BitsAndBytesConfig

    skip = {"llm_int8_skip_modules": skip_modules} if skip_modules else {}
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double, bnb_4bit_compute_dtype=compute_dtype, **skip)


def fits_cpu_4bit(in_features: int, out_features: int) -> bool:
    return out_features % CPU_4BIT_ROWS == 0 and in_features % CPU_4BIT_BLOCKSIZE == 0


def cpu_4bit_misfits(model) -> dict[str, tuple[int, int]]:
    """{name: (in, out) widths} of the nn.Linear layers bitsandbytes' CPU 4-bit kernel cannot repack.

    Works on a model built on the meta device (no weights needed)."""
    head = model.get_output_embeddings()
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and not fits_cpu_4bit(m.in_features, m.out_features)}


def output_head_name(model) -> str | None:
    head = model.get_output_embeddings()
    return next((name for name, module in model.named_modules() if module is head), None)


def keep_4bit_layout(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns layers changed.

    In eval mode without gradients (evaluation inside a training run) bitsandbytes 0.50 rewrites a
    4-bit weight into another layout in place, which fails for widths not divisible by 32 and
    leaves the training layers in a format the training path was not written for."""
    try:
        from bitsandbytes.nn import Linear4bit
    except Exception:
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def flatten_int8_inputs(model) -> int:
    """Let 8-bit layers take inputs of any rank; returns the number of layers hooked.

    bitsandbytes 0.50's int8 matmul flattens 3-D inputs only; DeepSeek-V3's attention
    sends 4-D ones and the CPU kernel then fails on a shape mismatch."""
    try:
        from bitsandbytes.nn import Linear8bitLt
    except Exception:
        return 0
    hooked = 0
    for module in model.modules():
        if isinstance(module, Linear8bitLt):
            module.register_forward_pre_hook(_flatten_input)
            module.register_forward_hook(_restore_output)
            hooked += 1
    return hooked


def _flatten_input(module, args):
    x = args[0]
    module._r1tune_shape = x.shape[:-1] if x.dim() > 3 else None
    return (x.reshape(-1, x.shape[-1]), *args[1:]) if x.dim() > 3 else None


def _restore_output(module, args, output):
    shape = module.__dict__.pop("_r1tune_shape", None)
    return output.reshape(*shape, output.shape[-1]) if shape is not None else None


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "quantization_method", None))
