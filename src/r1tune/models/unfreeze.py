"""Which decoder weights train: top-N layer freezing and progressive unfreezing.

A schedule is a list of entries, each naming a point in training (`step` or `epoch`),
the top `layers` decoder layers and the `modules` inside them. Entries add to what is
already trainable, so "first the top layers' MLPs, then attention layer by layer from
the top" is one entry per stage. The parameters an entry may unfreeze are the method's
candidates: every decoder-layer weight for `freeze`, the LoRA weights for `lora`.
"""

from __future__ import annotations

import math
import re

from torch import nn

from r1tune.config import GROUPS, UnfreezeEntry
from r1tune.errors import UserError

LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_indices(model: nn.Module) -> list[int]:
    return sorted({int(m.group(1)) for name, _ in model.named_parameters() if (m := LAYER.search(name))})


def in_modules(name: str, modules: tuple[str, ...]) -> bool:
    """True when a parameter name lies inside one of the named modules (any path component)."""
    return not modules or any(f".{word}." in f".{name}." for word in modules)


def select(names, layers: set[int], modules: tuple[str, ...]) -> list[str]:
    return [n for n in names if (m := LAYER.search(n)) and int(m.group(1)) in layers and in_modules(n, modules)]


def top_layers(all_layers: list[int], count: int | None) -> set[int]:
    return set(all_layers if count is None else all_layers[-count:])


def freeze_layers(model: nn.Module, n_layers: int, modules: str = "all", extra: str | None = None) -> None:
    """Train only the last n decoder layers (the first |n| when n is negative), limited to `modules`,
    plus the `extra` modules outside the layers (e.g. embed_tokens,norm)."""
    indices = layer_indices(model)
    if not indices or n_layers == 0 or abs(n_layers) > len(indices):
        raise UserError(
            f"config key 'freeze_trainable_layers' is {n_layers}; the model has {len(indices)} layers, "
            f"so use a value from 1 to {len(indices)} (or -1 to -{len(indices)} for the first layers)")
    chosen = set(indices[-n_layers:] if n_layers > 0 else indices[:-n_layers])
    words = _module_words(modules, model, "freeze_trainable_modules")
    trained = set(select([n for n, _ in model.named_parameters()], chosen, words))
    outside = _module_words(extra or "", model, "freeze_extra_modules") if extra else ()
    for name, param in model.named_parameters():
        param.requires_grad = name in trained or (bool(outside) and not LAYER.search(name) and in_modules(name, outside))


def _module_words(spec: str, model: nn.Module, key: str) -> tuple[str, ...]:
    words = tuple(GROUPS.get(w.strip(), w.strip()) for w in spec.split(",") if w.strip() and w.strip() != "all")
    names = [n for n, _ in model.named_parameters()]
    for word in words:
        if not any(in_modules(n, (word,)) for n in names):
            leaves = sorted({part for n in names for part in n.split(".")[:-1] if not part.isdigit()})
            raise UserError(f"config key '{key}': no module is named '{word}'; use names from: {', '.join(leaves)}")
    return words


class Unfreezer:
    """Applies a schedule to a model's candidate parameters; tells the trainer what became trainable."""

    def __init__(self, model: nn.Module, entries: list[UnfreezeEntry], steps_per_epoch: float):
        # the candidates: trainable weights inside decoder layers (anything else keeps its setting)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad and LAYER.search(n)}
        self.layers = layer_indices(model)
        self.due = sorted(((self._at(e, steps_per_epoch), i, e) for i, e in enumerate(entries)), key=lambda t: t[:2])
        for entry in entries:
            if entry.modules and not select(self.params, set(self.layers), entry.modules):
                raise UserError(f"unfreeze_schedule: no trainable weight lies in module '{', '.join(entry.modules)}'; "
                                "use mlp, self_attn, all or names of modules inside the decoder layers")
        for param in self.params.values():
            param.requires_grad = False

    @staticmethod
    def _at(entry: UnfreezeEntry, steps_per_epoch: float) -> int:
        return entry.step if entry.step is not None else math.ceil(entry.epoch * steps_per_epoch)

    def advance(self, step: int) -> list[tuple[UnfreezeEntry, list[tuple[str, nn.Parameter]]]]:
        """Unfreeze every entry due at or before `step`; returns (entry, newly trainable params) per entry."""
        done = []
        while self.due and self.due[0][0] <= step:
            _, _, entry = self.due.pop(0)
            names = select(self.params, top_layers(self.layers, entry.layers), entry.modules)
            new = [(n, self.params[n]) for n in names if not self.params[n].requires_grad]
            for _, param in new:
                param.requires_grad = True
            done.append((entry, new))
        return done
