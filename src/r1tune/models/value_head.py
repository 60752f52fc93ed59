"""The value head of a `stage: rm` reward model: one linear layer from the last hidden state to a
score, saved as value_head.safetensors beside the adapter or model with the tensor names TRL's and
LLaMA-Factory's value-head models use (v_head.summary.weight / .bias), so either can read it."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from r1tune.errors import UserError

VALUE_HEAD_FILE = "value_head.safetensors"
PREFIX = "v_head."


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.summary(states.to(self.summary.weight.dtype))


def save_value_head(head: ValueHead, folder: Path) -> Path:
    path = Path(folder) / VALUE_HEAD_FILE
    save_file({PREFIX + k: v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()}, str(path))
    return path


def load_value_head(folder: Path) -> ValueHead:
    """The value head of a reward-model run folder; UserError when it has none or it is unreadable."""
    path = Path(folder) / VALUE_HEAD_FILE
    if not path.is_file():
        raise UserError(f"'{folder}' has no {VALUE_HEAD_FILE}: it is not the output of a 'stage: rm' run")
    try:
        tensors = load_file(str(path))
        weight = tensors[PREFIX + "summary.weight"]
        head = ValueHead(weight.shape[1])
        head.load_state_dict({k.removeprefix(PREFIX): v for k, v in tensors.items()})
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"'{path}' is not a readable value head ({type(exc).__name__}); re-run the rm training") from None
    return head


def has_value_head(folder: Path) -> bool:
    return (Path(folder) / VALUE_HEAD_FILE).is_file()
