"""Int8 dynamic quantization of a merged Hugging Face causal LM for CPU inference.

Scheme ("int8 dynamic activation, int8 weight", the one torchao calls
``Int8DynamicActivationInt8WeightConfig``):

* each ``nn.Linear`` of the decoder (``model.model``) becomes an
  :class:`Int8DynamicLinear`: the weight is stored as a plain ``int8`` tensor
  with one fp32 scale per output channel (symmetric, range -127..127);
* at run time each activation row (token) is quantized on the fly to int8
  with its own symmetric scale, multiplied with ``torch._int_mm`` (int8 x int8
  -> int32, a native CPU kernel) and rescaled to fp32; the bias stays fp32.

Why not ``torch.ao.quantization.quantize_dynamic``: it still runs in torch 2.13
but is deprecated (DeprecationWarning: "torch.ao.quantization is deprecated ...
migrate to torchao ``quantize_``"), and the quantized dtypes it relies on
(``torch.qint8``, ``quantize_per_tensor``) are deprecated too. Its modules keep
their weights in opaque packed params that safetensors cannot store. torchao
is not installed here, so this module implements the same scheme with plain
tensors: everything is an ordinary ``int8``/``fp32`` tensor in the state dict.

Kept in fp32: the token embedding, the output head (``lm_head``, the layer
most sensitive to quantization error, often tied to the embedding; it is a
single matrix, so quantizing it buys little for tiny or tied models), norms,
and any parameter that is not an ``nn.Linear``. In particular DeepSeek-V3's
routed experts are fused 3-D parameters (``experts.gate_up_proj`` /
``experts.down_proj``) and its router is a custom module, so they stay fp32;
only its attention projections, shared experts and dense MLP layers are
quantized.

On disk (``out_dir``, written atomically: temp sibling folder, then rename):
``config.json``, ``generation_config.json``, the tokenizer files,
``model.safetensors`` (the whole state dict, int8 weights + ``weight_scale``
tensors included) and ``int8_quant.json`` (scheme + quantized module names).
Safetensors only: nothing is pickled. :func:`load_int8` rebuilds the model
from the config, swaps in the quantized modules, and loads the tensors.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from r1tune.export.evalset import EvalSet, eval_perplexity, fixed_sentences
from r1tune.fileio import atomic_folder

QUANT_FILE = "int8_quant.json"
WEIGHTS_FILE = "model.safetensors"
SCHEME = "int8_dynamic_activation_int8_weight_per_channel_symmetric"
DEFAULT_PROMPTS = ["Once upon a time", "The capital of France is", "def add(a, b):"]
MAX_NEW_TOKENS = 16


@dataclass
class Int8Report:
    """What quantize_int8 wrote, and how the int8 model compares with fp32."""

    path: Path
    size_bytes: int
    fp32_size_bytes: int
    tokens_per_s: float
    fp32_tokens_per_s: float
    metric_name: str
    metric: float
    fp32_metric: float
    metric_data: str  # what the metric was measured on, e.g. "32 held-out samples"


def _int_matmul(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) x int8 (N, K)^T -> int32 (M, N); in fp32 where _int_mm is missing or inexact.

    On a CPU without VNNI (AVX2 only, or oneDNN capped to it) oneDNN's int8 kernel adds pairs of
    products in saturating int16, and full-range int8 operands overflow it (bench/int8_kernel.py: 19 %
    of the largest result): there the fp32 product is used, exact below 2**24."""
    if x_q.device.type != "cpu" or _cpu_int8_exact():
        try:
            return torch._int_mm(x_q, w_q.t())
        except (RuntimeError, AttributeError):
            pass
    return (x_q.float() @ w_q.float().t()).round().to(torch.int32)


@lru_cache(maxsize=1)
def _cpu_int8_exact() -> bool:  # once per process: it reads /proc/cpuinfo
    from r1tune.envinfo import cpu_int8_exact

    return cpu_int8_exact()


class Int8DynamicLinear(nn.Module):
    """Linear with an int8 per-channel weight and per-token int8 activations quantized on the fly."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8DynamicLinear":
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None)
        mod.weight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        mod.weight_scale.copy_(scale)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach().float())
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, shape = x.dtype, x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        x_scale = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        x_q = torch.round(x2 / x_scale).clamp(-127, 127).to(torch.int8)
        y = _int_matmul(x_q, self.weight).float() * x_scale * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _decoder_linears(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules inside the decoder (embedding and lm_head excluded)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    prefix = next(n for n, m in model.named_modules() if m is decoder)
    return [f"{prefix}.{n}" if prefix else n for n, m in decoder.named_modules() if isinstance(m, nn.Linear)]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model: nn.Module) -> list[str]:
    """Replace the decoder's nn.Linear layers in place; returns the quantized module names."""
    names = _decoder_linears(model)
    for name in names:
        _swap(model, name, Int8DynamicLinear.from_linear(model.get_submodule(name)))
    return names


def load_fp32(model_dir: Path):
    """The merged export as the reference model: fp32, on the CPU."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _state_bytes(model: nn.Module) -> int:
    """Bytes of the persistent state (shared tensors counted once): what a safetensors file holds."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _write_folder(model, names: list[str], model_dir: Path, tmp: Path) -> None:
    from safetensors.torch import save_model
    from transformers import AutoTokenizer

    model.config.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "quantization": SCHEME})
    meta = {"scheme": SCHEME, "modules": names, "fp32": ["embeddings", "lm_head", "non-Linear parameters"]}
    (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)


def save_int8(model, names: list[str], model_dir: Path, out_dir: Path) -> Path:
    """Write the quantized model to out_dir atomically (temp sibling folder, then rename)."""
    with atomic_folder(out_dir) as tmp:
        _write_folder(model, names, model_dir, tmp)
    return out_dir


def load_int8(out_dir):
    """Rebuild the int8 model from out_dir: config -> model, swap quantized modules, load tensors."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    meta = json.loads((out_dir / QUANT_FILE).read_text(encoding="utf-8"))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out_dir), dtype=torch.float32)
    for name in meta["modules"]:
        lin = model.get_submodule(name)
        _swap(model, name, Int8DynamicLinear(lin.in_features, lin.out_features, lin.bias is not None))
    load_model(model, str(out_dir / WEIGHTS_FILE), strict=True)
    if (out_dir / "generation_config.json").exists():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(out_dir)
    return model.eval()


@torch.no_grad()
def _generate_seconds(model, tokenizer, prompt: str, max_new_tokens: int) -> float:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                   min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return time.perf_counter() - start


def tokens_per_s(models: list, tokenizer, prompts=DEFAULT_PROMPTS, max_new_tokens=MAX_NEW_TOKENS) -> list[float]:
    """Greedy-generation tokens/s for each model, measured side by side (interleaved, one warm-up)."""
    for m in models:
        _generate_seconds(m, tokenizer, prompts[0], 2)
    seconds = [0.0] * len(models)
    for prompt in prompts:
        for i, m in enumerate(models):
            seconds[i] += _generate_seconds(m, tokenizer, prompt, max_new_tokens)
    return [len(prompts) * max_new_tokens / s for s in seconds]


def quantize_int8(model_dir, out_dir, evalset: EvalSet | None = None) -> Int8Report:
    """Quantize a merged causal-LM folder to int8 (dynamic), save it, and compare with fp32 on `evalset`
    (default: the fixed sentences)."""
    from transformers import AutoTokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    evalset = evalset or fixed_sentences(tokenizer)
    fp32 = load_fp32(model_dir)
    fp32_bytes, fp32_ppl = _state_bytes(fp32), eval_perplexity(fp32, evalset, tokenizer)
    int8 = load_fp32(model_dir)
    names = quantize_model(int8)
    save_int8(int8, names, model_dir, out_dir)
    int8 = load_int8(out_dir)  # measure what was written, not the in-memory copy
    speed, fp32_speed = tokens_per_s([int8, fp32], tokenizer)
    return Int8Report(path=out_dir, size_bytes=(out_dir / WEIGHTS_FILE).stat().st_size,
                      fp32_size_bytes=fp32_bytes, tokens_per_s=speed, fp32_tokens_per_s=fp32_speed,
                      metric_name="perplexity", metric=eval_perplexity(int8, evalset, tokenizer),
                      fp32_metric=fp32_ppl, metric_data=evalset.description)
