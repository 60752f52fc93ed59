"""bitsandbytes copies of a merged export (`export_quantization_bit: 4 | 8`).

EXPORT_DIR/bnb-4bit holds nf4 weights with double quantization, bnb-8bit LLM.int8 weights; transformers
saves them in safetensors with the quantization recorded in config.json, so plain
`AutoModelForCausalLM.from_pretrained(folder)` loads them wherever bitsandbytes is installed.
This stands in for LLaMA-Factory's GPTQ export: bitsandbytes quantizes while loading and needs no
calibration data. Only nn.Linear layers are quantized; the embeddings, the output head and weights
that are not nn.Linear (DeepSeek-V3's fused routed experts and its router) stay fp32.
The folder is written beside its final place, reloaded and scored there, then renamed into place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r1tune.export.evalset import EvalSet, eval_perplexity, fixed_sentences
from r1tune.export.int8 import load_fp32
from r1tune.export.merge import safetensors_bytes
from r1tune.fileio import atomic_folder
from r1tune.models.quantize import (CPU_4BIT_BLOCKSIZE, CPU_4BIT_ROWS, cpu_4bit_misfits, flatten_int8_inputs, output_head_name,
                                    quantization_config, require_bitsandbytes)

INT8_CPU_NOTE = ("bitsandbytes' CPU LLM.int8 kernel takes inputs of at most 3 dimensions and this model's attention "
                 "sends 4-D ones, so the perplexity was measured with r1tune's input reshape "
                 "(r1tune.models.quantize.flatten_int8_inputs); its CUDA kernel takes any shape")
EXPERTS_NOTE = "DeepSeek-V3's fused routed experts (mlp.experts.*) are not nn.Linear layers and stay fp32"


@dataclass
class BnbReport:
    path: Path
    bits: int
    size_bytes: int
    fp32_size_bytes: int
    perplexity: float
    fp32_perplexity: float
    data: str  # what perplexity was measured on
    quantized_layers: int
    fp32_share: float  # share of the weights left in fp32
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return math.isfinite(self.perplexity)


def _placement() -> dict:
    """bitsandbytes quantizes on the device the weights are loaded to: the GPU when there is one."""
    return {"device_map": {"": torch.cuda.current_device()}} if torch.cuda.is_available() else {}


def quantize_bnb(model_dir, out_dir, bits: int, evalset: EvalSet | None = None) -> BnbReport:
    """Quantize the merged fp32 folder `model_dir` with bitsandbytes into `out_dir`, reload it with plain
    transformers and compare its perplexity with fp32 on `evalset` (default: the fixed sentences)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_bitsandbytes("export_quantization_bit")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    evalset = evalset or fixed_sentences(tokenizer)
    fp32_ppl = eval_perplexity(load_fp32(model_dir), evalset, tokenizer)
    skip, notes = _layers_kept_fp32(model_dir, bits)
    with atomic_folder(out_dir) as tmp:  # only a copy that reloaded and was measured replaces out_dir
        quantized = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, quantization_config=quantization_config(bits, skip_modules=skip),
            **_placement())
        quantized.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del quantized
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, **_placement())  # nothing from r1tune
        ppl, ppl_notes = _perplexity(reloaded, evalset, tokenizer)
        layers, share, kept = _quantized_share(reloaded)
        size = safetensors_bytes(tmp)
    return BnbReport(out_dir, bits, size, safetensors_bytes(model_dir), ppl, fp32_ppl, evalset.description,
                     layers, share, notes + ppl_notes + kept)


def _layers_kept_fp32(model_dir: Path, bits: int) -> tuple[list[str] | None, list[str]]:
    """4-bit: the layers bitsandbytes' CPU kernel cannot pack stay fp32 (with the output head), so the
    copy runs on every CPU and GPU; the list is recorded in config.json, which plain transformers reads."""
    if bits != 4:
        return None, []
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    misfits = cpu_4bit_misfits(skeleton)
    if not misfits:
        return None, []
    shown = ", ".join(f"{name} ({n_in} -> {n_out})" for name, (n_in, n_out) in list(misfits.items())[:3])
    more = f" and {len(misfits) - 3} more" if len(misfits) > 3 else ""
    note = (f"{len(misfits)} linear layers stay fp32 because bitsandbytes' CPU 4-bit kernel (AVX-512 BF16 "
            f"CPUs) needs output widths divisible by {CPU_4BIT_ROWS} and input widths by {CPU_4BIT_BLOCKSIZE}: "
            f"{shown}{more}")
    return [output_head_name(skeleton) or "lm_head", *misfits], [note]


def _perplexity(model, evalset: EvalSet, tokenizer) -> tuple[float, list[str]]:
    try:
        return eval_perplexity(model, evalset, tokenizer), []
    except RuntimeError:
        if not flatten_int8_inputs(model):  # not the CPU int8 shape limit
            raise
        return eval_perplexity(model, evalset, tokenizer), [INT8_CPU_NOTE]


def _quantized_share(model) -> tuple[int, float, list[str]]:
    """Quantized layers, the share of weights left in fp32, and a note when fused experts are among them."""
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    layers = [m for m in model.modules() if isinstance(m, (Linear4bit, Linear8bitLt))]
    inside = {id(p) for m in layers for p in m.parameters()}
    quantized = sum(m.in_features * m.out_features for m in layers)  # Params4bit is stored packed
    kept = {n: p.numel() for n, p in model.named_parameters() if id(p) not in inside}
    share = sum(kept.values()) / max(sum(kept.values()) + quantized, 1)
    return len(layers), share, [EXPERTS_NOTE] if any(".experts." in n for n in kept) else []
