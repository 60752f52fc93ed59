"""RunConfig in sections, every problem of a file reported at once, and the preference-stage keys."""

import subprocess
import sys
import typing

import pytest

from r1tune.config import SECTIONS, STAGE_KEYS, RunConfig, config_docs_markdown, load_config, validate_config
from r1tune.errors import UserError
from r1tune.stages import STAGES

BASE = {"model_name_or_path": "m", "dataset": "d.jsonl", "output_dir": "o"}


# --- sections ------------------------------------------------------------------------------------------
def test_every_key_is_in_exactly_one_section_in_doc_order():
    keys = [key for cls in SECTIONS.values() for key in cls.model_fields]
    assert len(keys) == len(set(keys))
    assert keys == list(RunConfig.model_fields)  # same keys, and the saved run file follows SECTIONS
    assert all(issubclass(RunConfig, cls) for cls in SECTIONS.values())


def test_section_returns_its_keys_as_the_section_class():
    cfg = validate_config({**BASE, "learning_rate": 1e-4, "lora_rank": 4})
    training = cfg.section("training")
    assert isinstance(training, SECTIONS["training"]) and training.learning_rate == 1e-4
    assert set(training.model_dump()) == set(SECTIONS["training"].model_fields)
    assert "learning_rate" in training.model_fields_set and "seed" not in training.model_fields_set
    assert cfg.section("method").effective_lora_alpha == 8  # section methods come along
    with pytest.raises(KeyError):
        cfg.section("nope")


def test_docs_have_one_table_per_section():
    docs = config_docs_markdown()
    for name, cls in SECTIONS.items():
        assert f"\n## {name}\n\n{cls.__doc__.strip()}\n\n| key | default | meaning |" in docs
    assert docs.count("| key | default | meaning |") == len(SECTIONS)


# --- several problems at once ---------------------------------------------------------------------------
def test_unknown_key_wrong_type_and_out_of_range_are_reported_together(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model_name_or_path: m\ndataset: d.jsonl\noutput_dir: o\n"
                    "lora_rnak: 8\nlearning_rate: fast\nlora_dropout: 1.5\n")
    with pytest.raises(UserError) as exc:
        load_config(path)
    head, *lines = str(exc.value).splitlines()
    assert head == f"{path}: 3 problems:"
    assert lines == ["  - unknown key 'lora_rnak' — did you mean 'lora_rank'?",  # in the order of the file
                     "  - invalid value for 'learning_rate': Input should be a valid number, unable to parse "
                     "string as a number (got 'fast')",
                     "  - invalid value for 'lora_dropout': Input should be less than 1 (got 1.5)"]


def test_contradictions_between_keys_are_all_listed():
    with pytest.raises(UserError) as exc:
        validate_config({**BASE, "bf16": True, "fp16": True, "max_steps": 0, "optim": "adamw_8bt",
                         "expert_ids": "1", "expert_top_k": 2}, source="run.yaml")
    text = str(exc.value)
    assert text.startswith("run.yaml: 4 problems:\n")
    for part in ("bf16 and fp16", "max_steps must be", "did you mean 'adamw_8bit'", "choose experts one way"):
        assert part in text


def test_one_problem_keeps_its_sentence():
    with pytest.raises(UserError, match=r"^run.yaml: bf16 and fp16 cannot both be true; pick one$"):
        validate_config({**BASE, "bf16": True, "fp16": True}, source="run.yaml")


def test_several_problems_exit_2_from_the_cli(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\noutput_dir: o\nlora_rnak: 8\nlora_dropout: 1.5\n")
    proc = subprocess.run([sys.executable, "-m", "r1tune", "train", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "2 problems:" in proc.stderr and "Traceback" not in proc.stderr


# --- preference-stage keys ------------------------------------------------------------------------------
def test_preference_keys_have_llamafactory_defaults():
    cfg = validate_config(BASE)
    assert (cfg.pref_beta, cfg.pref_ftx, cfg.pref_loss, cfg.simpo_gamma, cfg.dpo_label_smoothing,
            cfg.precompute_ref_log_probs, cfg.kto_chosen_weight, cfg.kto_rejected_weight) == \
        (0.1, 0.0, "sigmoid", 0.5, 0.0, None, 1.0, 1.0)


def test_stage_keys_belong_to_the_stage_sections():
    owned = {key for keys in STAGE_KEYS.values() for key in keys}
    assert owned == set(SECTIONS["dpo"].model_fields) | set(SECTIONS["kto"].model_fields) | set(SECTIONS["grpo"].model_fields)
    assert typing.get_args(RunConfig.model_fields["stage"].annotation) == tuple(STAGES)


@pytest.mark.parametrize("extra, message", [
    ({"pref_beta": 0}, "invalid value for 'pref_beta'.*greater than 0"),
    ({"dpo_label_smoothing": 0.6}, "invalid value for 'dpo_label_smoothing'.*less than or equal to 0.5"),
    ({"pref_loss": "kto"}, "invalid value for 'pref_loss'.*'sigmoid', 'hinge', 'ipo', 'orpo' or 'simpo'"),
    ({"dpo_label_smoothing": 0.1, "pref_loss": "ipo"}, "^run.yaml: 'dpo_label_smoothing' \\(cDPO\\) works with "
                                                       "pref_loss sigmoid only, not 'ipo'"),
])
def test_bad_preference_values(extra, message):
    with pytest.raises(UserError, match=message):
        validate_config({**BASE, **extra}, source="run.yaml")


def test_preference_key_for_another_stage_is_only_a_notice(capsys):
    validate_config({**BASE, "stage": "sft", "pref_beta": 0.2, "pref_loss": "hinge"}, source="run.yaml")
    err = capsys.readouterr().err
    assert "note: run.yaml: 'pref_beta' applies to stage dpo / kto, not 'sft'; it has no effect" in err
    assert "note: run.yaml: 'pref_loss' applies to stage dpo, not 'sft'; it has no effect" in err


@pytest.mark.skipif(not {"dpo", "kto"} <= set(STAGES), reason="the dpo / kto stages are not declared yet")
def test_preference_keys_for_their_stage_are_quiet(capsys):
    cfg = validate_config({**BASE, "stage": "kto", "pref_beta": 0.2, "kto_rejected_weight": 1.5}, source="run.yaml")
    assert "note:" not in capsys.readouterr().err
    assert cfg.stage_options()["pref_beta"] == 0.2 and cfg.stage_options()["kto_rejected_weight"] == 1.5
    validate_config({**BASE, "stage": "kto", "pref_loss": "simpo"}, source="run.yaml")
    assert "'pref_loss' applies to stage dpo, not 'kto'" in capsys.readouterr().err
