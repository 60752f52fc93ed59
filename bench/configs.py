"""The YAML config files the benches hand to `r1tune train` and `llamafactory-cli train`."""

from __future__ import annotations

import json
from pathlib import Path


def write_config(path: Path, keys: dict) -> Path:
    """One `key: value` line per key; JSON scalars and strings are valid YAML."""
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()), encoding="utf-8")
    return path
