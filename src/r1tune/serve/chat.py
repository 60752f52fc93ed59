"""Terminal chat with a fine-tuned output dir: streaming, reasoning shown apart from the answer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from r1tune.data.templates import THINK_CLOSE
from r1tune.errors import UserError
from r1tune.models.bottleneck import CONFIG as BOTTLENECK_CONFIG
from r1tune.models.bottleneck import load_bottleneck
from r1tune.models.loading import load_model, load_tokenizer, read_adapter_base
from r1tune.models.methods import load_lora, merge_adapters, merged_adapters
from r1tune.models.quantize import quantization_config

DIM, RESET = "\033[2m", "\033[0m"


def load_for_chat(folder: str, quantized: bool = True):
    """(model, tokenizer) from an r1tune output dir: base + PEFT adapter (LoRA, AdaLoRA, virtual tokens),
    base + bottleneck adapters, or a full model. A QLoRA adapter gets its base quantized as in training
    (quantized=False: in full precision, e.g. to merge it)."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"'{folder}' is not a folder; pass an r1tune output_dir or a model folder")
    bottleneck = read_bottleneck_base(path)
    base = read_adapter_base(path) or bottleneck
    tokenizer = load_tokenizer(str(path), is_model_dir=base is None)
    if base is None:
        return load_model(str(path)), tokenizer
    run = training_config(path)
    model = load_model(base, quantization=training_quantization(run) if quantized else None)
    model = merge_adapters(model, merged_adapters(run.get("adapter_name_or_path"), run.get("create_new_adapter", False)))
    if bottleneck:
        return load_bottleneck(model, path), tokenizer
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:  # domain tokens were added
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the adapter holds the new rows
    return load_lora(model, str(path)), tokenizer


def read_bottleneck_base(folder: Path) -> str | None:
    config = folder / BOTTLENECK_CONFIG
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{config}: not a valid bottleneck adapter config; re-save the adapter") from None


def training_config(folder: Path) -> dict:
    """The run config saved with an output dir ({} for a folder r1tune did not write)."""
    saved = folder / "r1tune_config.yaml"
    return (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}) if saved.is_file() else {}


def training_quantization(raw: dict):
    """The BitsAndBytesConfig a run trained over (QLoRA), or None."""
    if not raw.get("quantization_bit"):
        return None
    import torch

    compute = torch.bfloat16 if raw.get("bf16") else torch.float32
    return quantization_config(raw["quantization_bit"], raw.get("quantization_type", "nf4"),
                               raw.get("double_quantization", True), compute)


class ReasoningPrinter:
    """Prints streamed text; reasoning (before </think>) dimmed under its own heading."""

    def __init__(self, out=None, reasoning_open: bool = True):
        out = out or sys.stdout  # looked up now: stdout may have been replaced since import
        self.out, self.in_reasoning, self.buffer = out, reasoning_open, ""
        self.answer_started = False
        self.color = out.isatty()
        if reasoning_open:
            self._write("[reasoning]\n", dim=True)

    def feed(self, text: str) -> None:
        if not self.in_reasoning:
            self._write_answer(text)
            return
        self.buffer += text
        if THINK_CLOSE in self.buffer:
            thought, _, rest = self.buffer.partition(THINK_CLOSE)
            self._write(thought, dim=True)
            self._write("\n[answer]\n")
            self.in_reasoning, self.buffer = False, ""
            self._write_answer(rest)
        elif len(self.buffer) > len(THINK_CLOSE):
            keep = len(THINK_CLOSE)  # hold back a possible partial tag
            self._write(self.buffer[:-keep], dim=True)
            self.buffer = self.buffer[-keep:]

    def _write_answer(self, text: str) -> None:
        if not self.answer_started:  # the blank line after </think> is layout, not answer
            text = text.lstrip("\n")
            self.answer_started = bool(text)
        self._write(text)

    def finish(self) -> None:
        if self.buffer:
            self._write(self.buffer, dim=self.in_reasoning)
        self._write("\n")

    def _write(self, text: str, dim: bool = False) -> None:
        self.out.write(f"{DIM}{text}{RESET}" if dim and self.color else text)
        self.out.flush()


def reply(model, tokenizer, messages: list[dict], max_new_tokens: int, temperature: float, out=None) -> str:
    """Stream one assistant reply to `out`; return the full generated text. It decodes with the
    server's engine, so chat and serve give the same tokens (virtual-token adapters included)."""
    from r1tune.serve.engine import Engine, eos_ids_of
    from r1tune.serve.sampling import Params
    from r1tune.serve.ticket import Generated, Ticket

    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]  # the template writes BOS itself
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine = Engine(model, pad, max_batch=1, wait_s=0)
    printer, pieces = ReasoningPrinter(out, reasoning_open=prompt.rstrip().endswith("<think>")), []
    try:
        ticket = engine.submit(Ticket(ids, Params(max_new_tokens, temperature), None, eos_ids_of(model, tokenizer)))
        for piece in ticket.read(tokenizer, []):
            if not isinstance(piece, Generated):
                pieces.append(piece)
                printer.feed(piece)
    finally:
        engine.close()
    printer.finish()
    return "".join(pieces)


def chat_loop(model, tokenizer, system: str | None, max_new_tokens: int, temperature: float) -> None:
    messages = [{"role": "system", "content": system}] if system else []
    print("r1tune chat — type a message; /clear starts over, /exit quits.")
    while True:
        try:
            text = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/clear":
            messages = messages[:1] if system else []
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, messages, max_new_tokens, temperature)
        messages.append({"role": "assistant", "content": answer})
