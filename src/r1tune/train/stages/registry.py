"""The training stages `r1tune train` can run, by the name `stage:` gives (r1tune.stages declares
what each needs from its data). sft and pt share one runner: pt is the causal-LM loss over every
token of plain text, which the data layer already prepares; dpo, kto and rm share the preference
runner; grpo generates what it trains on."""

from __future__ import annotations

from r1tune.stages import STAGES
from r1tune.train.stages.grpo import run_grpo
from r1tune.train.stages.preference import run_preference
from r1tune.train.stages.sft import run_sft

RUNNERS = {"sft": run_sft, "pt": run_sft, "dpo": run_preference, "kto": run_preference, "rm": run_preference,
           "grpo": run_grpo}
assert set(RUNNERS) == set(STAGES), "every declared stage needs a runner, and every runner a declaration"


def run_stage(cfg):
    """Train as cfg.stage says; returns what the stage's runner returns."""
    return RUNNERS[cfg.stage](cfg)
