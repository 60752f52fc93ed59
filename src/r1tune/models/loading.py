"""Load a base model and tokenizer from a local folder or a hub id, with clear errors."""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from r1tune.errors import UserError
from r1tune.models.attention import use_cpu_attention
from r1tune.process import is_main


def looks_like_hub_id(name: str) -> bool:
    """'org/name' with no leading ./, / or ~ (those are local paths)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name))


def ensure_tiny_model(path: str, arch: str | None) -> None:
    """Build the tiny demo model at `path` when the config asks for one and it is absent."""
    if arch and not Path(path).exists():
        from r1tune.models.tiny import build_tiny

        if is_main():
            print(f"building tiny {arch} model at {path} (offline, seeded)")
        build_tiny(path, arch)


def check_model_source(name: str) -> None:
    """A local folder must hold config.json; a missing local path is an error before any download try."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model_name_or_path '{name}' is a folder but not a model (no config.json in it); point it at a saved model folder")
        return
    if path.exists():
        raise UserError(f"model_name_or_path '{name}' is a file, not a model folder; point it at the folder holding config.json")
    local_parent = path.parent.is_dir() and str(path.parent) not in ("", ".")  # 'outputs/x' is a path, not a hub id
    if not looks_like_hub_id(name) or local_parent:
        raise UserError(f"model_name_or_path '{name}' does not exist; give a local model folder or a hub id like 'org/name'")


def load_tokenizer(name: str, trust_remote_code: bool = False, is_model_dir: bool = True):
    """Tokenizer from a model folder or hub id (is_model_dir=False: e.g. an adapter folder)."""
    from transformers import AutoTokenizer

    if is_model_dir:
        check_model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load a tokenizer from '{name}' ({_first_line(exc)}); download the model to a local folder and point model_name_or_path there") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"the tokenizer of '{name}' has no fast (tokenizer.json) version, which r1tune needs for exact label masks; convert it with transformers first")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               attn_implementation: str | None = None, quantization=None):
    """A causal LM; `quantization` is a transformers BitsAndBytesConfig (QLoRA) or None."""
    from transformers import AutoModelForCausalLM

    from r1tune.models.quantize import flatten_int8_inputs, keep_4bit_layout

    check_model_source(name)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        if torch.cuda.is_available():  # bitsandbytes places quantized weights at load; the trainer does not move them
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        with _bars_on_main_only():
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load the model '{name}' ({_first_line(exc)}); check model_name_or_path") from None
    use_cpu_attention(model)  # CPU: MLA through the fused kernel, short training rows written out
    if quantization is not None:
        flatten_int8_inputs(model)
        keep_4bit_layout(model)
    return model


@contextmanager
def _bars_on_main_only():
    """transformers' progress bars ("Loading weights") off while another process than the main one loads."""
    from transformers.utils import logging as hf_logging

    if is_main() or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def read_adapter_base(folder: Path) -> str | None:
    """The base model recorded in a PEFT adapter folder, or None for a full model."""
    config = folder / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{config}: not a valid adapter config (JSON object); re-save the adapter") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def resolve_model_path(name: str) -> str:
    """Absolute path for a local folder (so saved adapters find their base from anywhere); hub ids unchanged."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name
