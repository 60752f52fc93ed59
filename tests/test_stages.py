"""Stages are declared once (r1tune.stages) and run through one registry; data and errors follow the declaration."""

import pytest

from r1tune.config import validate_config
from r1tune.errors import UserError
from r1tune.stages import KIND_NAMES, STAGES, stage_data, wrong_kind_message
from r1tune.train.stages.registry import RUNNERS


def test_every_stage_has_a_runner_and_valid_declaration():
    assert set(RUNNERS) == set(STAGES)
    for name, stage in STAGES.items():
        assert stage.name == name and stage.long_samples in ("chunk", "truncate")
        assert set(stage.kinds) <= set(KIND_NAMES)


def test_config_accepts_exactly_the_declared_stages():
    needs = {"grpo": {"reward_funcs": ["accuracy"]}}  # a stage's own required keys
    for name in STAGES:
        assert validate_config({"model_name_or_path": "m", "stage": name, **needs.get(name, {})}).stage == name
    with pytest.raises(UserError, match="'stage'"):
        validate_config({"model_name_or_path": "m", "stage": "dpo_typo"})


def test_wrong_kind_names_the_stage_that_takes_it_or_says_none_does():
    assert wrong_kind_message("text", "sft").endswith("set 'stage: pt'")
    assert wrong_kind_message("kto", "sft").endswith("set 'stage: kto'")
    assert wrong_kind_message("preference", "sft").endswith("set 'stage: dpo'")
    assert stage_data("pt").reads_text and not stage_data("sft").reads_text
