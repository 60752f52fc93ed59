"""What attaching a method leaves behind for the rest of a run, kept in a plain record.

Not attributes on the model or its parameters: a DDP/FSDP wrapper (or a copy of the model) would
drop those, and a plain record says at the call site who needs what."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class MethodState:
    pissa_start: Path | None = None  # PiSSA's starting adapter, to save the result as plain LoRA
    # parameter name -> the share of it that trains (expert-selective tuning masks the rest)
    trained_share: dict[str, float] = field(default_factory=dict)
    # parameter name -> handle of the gradient hook masking its unselected experts
    expert_hooks: dict[str, object] = field(default_factory=dict)
