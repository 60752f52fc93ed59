"""Export a Hugging Face causal LM to ONNX and check it against PyTorch with onnxruntime.

The graph is a full-sequence forward with no KV cache: inputs ``input_ids`` and
``attention_mask`` (int64, dynamic batch and sequence axes), output ``logits``
(batch, sequence, vocab). It suits scoring and simple generation (re-run the
whole prefix for each new token); it is not an incremental-decoding graph.

How it exports:

* ``torch.onnx.export(dynamo=True)`` is tried first; when it raises, the
  TorchScript exporter (``dynamo=False``) is the fallback. The report says which ran.
* Attention: "sdpa" and "eager" both export; any other implementation (flash
  attention, flex, ...) is switched to "sdpa" for the export and restored after.
* Mixture-of-experts models whose experts follow transformers' experts
  interface (DeepSeek-V3's fused 3-D expert tensors): the default "grouped_mm"
  kernel is an opaque custom op with no ONNX translation, and "eager" loops over
  the experts that were hit (a data-dependent loop that torch.export rejects).
  The export therefore switches to "batched_mm" (gather each token's expert
  weights, then bmm), which is exact and exports, and restores the setting after.

The folder is written atomically: everything goes to a temporary sibling folder,
which is validated and then renamed onto ``out_dir``. Validation runs
onnxruntime (CPU) on a fixed random batch with padding at a sequence length and
batch size different from the trace, and compares fp32 logits with PyTorch on
the real (non-padding) positions; logits at padding positions are undefined
(their attention row is fully masked) and differ between implementations.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from r1tune.errors import UserError
from r1tune.fileio import atomic_folder

INPUTS = ("input_ids", "attention_mask")
OUTPUT = "logits"
FILENAME = "model.onnx"
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to a side file (ONNX protobuf caps at 2 GiB)
EXPORTABLE_ATTENTION = ("eager", "sdpa")
EXPORTABLE_EXPERTS = "batched_mm"


@dataclass
class OnnxReport:
    """What export_onnx wrote and how closely onnxruntime matched PyTorch."""

    path: Path
    size_bytes: int
    max_abs_diff: float
    seconds: float
    exporter: str = "dynamo"  # "dynamo" or "torchscript"


class LogitsOnly(torch.nn.Module):
    """forward(input_ids, attention_mask) -> logits, without a KV cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits


def export_onnx(model, out_dir, opset: int | None = None, seq_len: int = 16) -> OnnxReport:
    """Export ``model`` (a loaded causal LM or a model folder) to ``out_dir/model.onnx`` and validate it."""
    start = time.perf_counter()
    model = _load(model)
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:  # only a graph that passed validation replaces out_dir
        with _exportable(model):
            exporter = _export(LogitsOnly(model).eval(), tmp / FILENAME, opset, seq_len)
            diff = validate(model, tmp / FILENAME, seq_len + 5, batch=3)
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    return OnnxReport(out_dir / FILENAME, size, diff, time.perf_counter() - start, exporter)


def _load(model):
    """A path is loaded as an fp32 causal LM; a loaded model must already be fp32."""
    if isinstance(model, (str, Path)):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise UserError(f"ONNX export expects an fp32 model but this one is {dtype}; load it with dtype=torch.float32.")
    return model.eval()


@contextlib.contextmanager
def _exportable(model):
    """Temporarily switch attention and experts to implementations that export; restore after."""
    attn = getattr(model.config, "_attn_implementation", None)
    experts = getattr(model.config, "_experts_implementation", None)
    try:
        if attn not in EXPORTABLE_ATTENTION and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("sdpa")
        if experts not in (None, EXPORTABLE_EXPERTS):
            model.set_experts_implementation(EXPORTABLE_EXPERTS)
        yield
    finally:
        if experts not in (None, EXPORTABLE_EXPERTS):
            model.set_experts_implementation(experts)
        if attn not in EXPORTABLE_ATTENTION and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn)


def sample_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0):
    """Fixed random ids with padding: row 1 left-padded, row 2 right-padded (when present)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    pad = max(1, seq_len // 4)
    if batch > 1:
        mask[1, :pad] = 0
    if batch > 2:
        mask[2, seq_len - pad:] = 0
    return ids, mask


def _export(wrapper, path: Path, opset, seq_len: int) -> str:
    """Try the dynamo exporter, then TorchScript; return the name of the one that worked."""
    args = sample_batch(wrapper.model.config.vocab_size, 2, seq_len)
    external = _param_bytes(wrapper) > EXTERNAL_DATA_BYTES
    try:
        _export_dynamo(wrapper, args, path, opset, external)
        return "dynamo"
    except Exception as dynamo_err:  # noqa: BLE001 - any exporter failure means: try the other one
        _clear(path.parent)
        try:
            _export_torchscript(wrapper, args, path, opset)
            return "torchscript"
        except Exception as ts_err:  # noqa: BLE001
            raise UserError(
                f"ONNX export failed for {type(wrapper.model).__name__}: dynamo exporter: "
                f"{_first_line(dynamo_err)}; TorchScript exporter: {_first_line(ts_err)}."
            ) from ts_err


def _export_dynamo(wrapper, args, path: Path, opset, external: bool) -> None:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {name: {0: batch, 1: seq} for name in INPUTS}
    with _quiet():
        torch.onnx.export(wrapper, args, str(path), input_names=list(INPUTS), output_names=[OUTPUT],
                          opset_version=opset, dynamo=True, external_data=external,
                          dynamic_shapes=shapes, verbose=False)


def _export_torchscript(wrapper, args, path: Path, opset) -> None:
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUTS, OUTPUT)}
    with _quiet():
        torch.onnx.export(wrapper, args, str(path), input_names=list(INPUTS), output_names=[OUTPUT],
                          opset_version=opset or 17, dynamo=False, dynamic_axes=axes)


def validate(model, path: Path, seq_len: int, batch: int = 3) -> float:
    """Max abs difference of fp32 logits (real tokens only) between onnxruntime and PyTorch."""
    ids, mask = sample_batch(model.config.vocab_size, batch, seq_len, seed=1)
    got = run_onnx(path, ids.numpy(), mask.numpy())
    with torch.no_grad():
        want = LogitsOnly(model)(ids, mask).float().numpy()
    if got.shape != want.shape:
        raise UserError(f"ONNX logits have shape {got.shape} but PyTorch gives {want.shape}; the export is broken.")
    diff = float(np.abs(got - want)[mask.numpy().astype(bool)].max())
    if not np.isfinite(diff):
        raise UserError(f"ONNX logits at {path} are not finite; the export is broken.")
    return diff


def run_onnx(path, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Logits from onnxruntime on CPU for int64 ``input_ids`` and ``attention_mask``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
    return session.run([OUTPUT], feeds)[0]


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _clear(folder: Path) -> None:
    for p in folder.iterdir():
        p.unlink() if p.is_file() else shutil.rmtree(p, ignore_errors=True)


def _first_line(err: Exception) -> str:
    """The innermost cause's type and first line (exporter errors wrap the real reason)."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def _quiet():
    """Silence exporter warnings (deprecations, tracer notes); errors still raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
