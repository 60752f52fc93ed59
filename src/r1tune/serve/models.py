"""What one server serves: a model in memory and the request `model` names that choose from it.

The run's model comes first. `serve_adapters` adds more LoRA adapters trained over the same
base; they are loaded into the same PEFT model (one copy of the base weights), and a request's
`model` name picks which adapter the engine switches on for its batch. `serve_base_name` serves
the base itself with every adapter switched off.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from r1tune.errors import UserError
from r1tune.models.loading import load_tokenizer, read_adapter_base, resolve_model_path

PRIMARY = "default"  # PEFT's name for the first adapter it loads


@dataclass
class Served:
    name: str
    adapter: str | None  # the PEFT adapter to switch on; None: adapters off (or a plain model)
    tokenizer: object


@dataclass
class ServedSet:
    model: object
    entries: dict[str, Served]

    def activate(self, adapter: str | None) -> None:
        """Switch the model to `adapter` (engine thread only, between batches)."""
        if not hasattr(self.model, "peft_config"):
            return
        tuner = self.model.base_model
        if adapter is None:
            tuner.disable_adapter_layers()
        else:
            tuner.enable_adapter_layers()
            self.model.set_adapter(adapter)


def is_lora_peft(model) -> bool:
    config = getattr(model, "peft_config", {}).get(PRIMARY)
    return config is not None and not config.is_prompt_learning


def load_served(cfg) -> ServedSet:
    from r1tune.models.configured import load_configured

    loaded = load_configured(cfg)
    model, tokenizer = loaded.model, loaded.tokenizer
    if getattr(getattr(model, "peft_config", {}).get(PRIMARY), "peft_type", None) == "PREFIX_TUNING":
        raise UserError(f"{cfg.source}: r1tune serve does not batch prefix_tuning adapters (their virtual keys and "
                        "values live in the cache); talk to it with r1tune chat, or train p_tuning / prompt_tuning")
    primary = Served(cfg.serve_model_name or loaded.label, PRIMARY if is_lora_peft(model) else None, tokenizer)
    entries = {primary.name: primary}
    check_names([primary.name, *(cfg.serve_adapters or {}), *([cfg.serve_base_name] if cfg.serve_base_name else [])],
                cfg.source)
    for i, (name, folder) in enumerate((cfg.serve_adapters or {}).items()):
        adapter = f"served_{i + 1}"  # PEFT's own name: a user's name like 'a' would clash with 'lora_' keys
        model = add_adapter(model, name, adapter, Path(folder), loaded.base, cfg.source)
        entries[name] = Served(name, adapter, adapter_tokenizer(Path(folder), tokenizer, cfg.source))
    if cfg.serve_base_name:
        if not hasattr(model, "peft_config"):
            raise UserError(f"{cfg.source}: serve_base_name serves the base with its adapters off, but this model has "
                            "no LoRA adapter (a full model or bottleneck adapters); remove serve_base_name")
        entries[cfg.serve_base_name] = Served(cfg.serve_base_name, None, tokenizer)
    return ServedSet(model, entries)


def check_names(names: list[str], source: str) -> None:
    for i, name in enumerate(names):
        if not name.strip() or name in names[:i]:
            raise UserError(f"{source}: the served model name '{name}' is empty or used twice; give every adapter in "
                            "serve_adapters (and serve_model_name / serve_base_name) its own name")


def add_adapter(model, name: str, adapter: str, folder: Path, base: str, source: str):
    """`model` with the LoRA adapter in `folder` (served as `name`) loaded beside its own as `adapter`."""
    from peft import PeftModel

    from r1tune.models.methods import exact_lora_targets

    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"{source}: serve_adapters '{name}': '{folder}' holds no LoRA adapter (no adapter_config.json); "
                        "give the output_dir of an r1tune LoRA run or a PEFT adapter folder")
    own_base = read_adapter_base(folder)
    if own_base and resolve_model_path(own_base) != base:
        if Path(own_base).expanduser().exists() or not Path(base).exists():  # another base, not a moved folder
            raise UserError(f"{source}: serve_adapters '{name}' was trained over '{own_base}', not this server's "
                            f"base '{base}'; serve it from its own config")
        print(f"warning: {source}: serve_adapters '{name}' records the base '{own_base}', which no longer exists; "
              f"loading it over '{base}'", file=sys.stderr)
    if getattr(model, "peft_config", {}).get(PRIMARY) and not is_lora_peft(model):
        raise UserError(f"{source}: serve_adapters need a LoRA model first; this run's adapter uses virtual tokens")
    try:
        with exact_lora_targets():
            if hasattr(model, "peft_config"):
                model.load_adapter(str(folder), adapter_name=adapter)
                return model
            return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{source}: serve_adapters '{name}' ('{folder}') does not fit this model ({str(exc)[:200]}); "
                        "only LoRA adapters of the same base and vocabulary can be served together") from None


def adapter_tokenizer(folder: Path, fallback, source: str):
    """The adapter folder's own tokenizer (its chat template) when it has one, with the same vocabulary."""
    if not (folder / "tokenizer_config.json").is_file():
        return fallback
    tokenizer = load_tokenizer(str(folder), is_model_dir=False)
    if len(tokenizer) != len(fallback):
        raise UserError(f"{source}: the adapter '{folder}' has a vocabulary of {len(tokenizer)} tokens, this server's "
                        f"model {len(fallback)}; an adapter with added tokens must be served on its own")
    if tokenizer.chat_template != fallback.chat_template:
        print(f"note: {source}: '{folder}' renders prompts with its own chat template", file=sys.stderr)
    return tokenizer


def single(model, tokenizer, name: str) -> ServedSet:
    """A ServedSet of one already loaded model (tests, scripts)."""
    return ServedSet(model, {name: Served(name, PRIMARY if is_lora_peft(model) else None, tokenizer)})
