import pytest

from r1tune.config import RunConfig, config_docs_markdown, load_config, validate_config
from r1tune.errors import UserError
from tests.conftest import ROOT

BASE = {"model_name_or_path": "m", "dataset": "d.jsonl", "output_dir": "o"}


def test_unknown_key_names_file_key_and_suggestion():
    with pytest.raises(UserError, match=r"unknown key 'lora_rnak' in run.yaml — did you mean 'lora_rank'\?"):
        validate_config({**BASE, "lora_rnak": 8}, source="run.yaml")


def test_wrong_type_names_key_and_value():
    with pytest.raises(UserError, match=r"run.yaml: invalid value for 'lora_rank'.*'abc'"):
        validate_config({**BASE, "lora_rank": "abc"}, source="run.yaml")


def test_out_of_range_value():
    with pytest.raises(UserError, match=r"invalid value for 'lora_dropout'.*less than 1"):
        validate_config({**BASE, "lora_dropout": 1.5}, source="run.yaml")


def test_choice_lists_allowed_values():
    with pytest.raises(UserError, match=r"'finetuning_type'.*'lora', 'full', 'freeze', .* or 'bottleneck'"):
        validate_config({**BASE, "finetuning_type": "lorra"}, source="run.yaml")


def test_missing_required_key():
    with pytest.raises(UserError, match=r"run.yaml: required key 'model_name_or_path' is missing; add it to the file"):
        validate_config({"dataset": "d", "output_dir": "o"}, source="run.yaml")


def test_dataset_and_output_dir_are_required_by_the_commands_that_need_them():
    cfg = validate_config({"model_name_or_path": "m", "export_dir": "e"}, source="merge.yaml")  # export-only
    with pytest.raises(UserError, match=r"^merge.yaml: required key 'dataset' is missing; add it to the file "
                                        r"\(r1tune train needs it\)$"):
        cfg.require("dataset", "output_dir", command="r1tune train")


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: m\ndataset: d.jsonl\noutput_dir: o\n")
    cfg = load_config(path, ["lora_rank=32", "bf16=true", "learning_rate=1e-4"])
    assert (cfg.lora_rank, cfg.bf16, cfg.learning_rate) == (32, True, 1e-4)
    assert cfg.effective_lora_alpha == 64


def test_bad_yaml_reports_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: m\ndataset: [unclosed\n")
    with pytest.raises(UserError, match=r"run.yaml line \d+: not valid YAML"):
        load_config(path)


def test_llamafactory_keys_accepted(capsys):
    lf = {**BASE, "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_target": "all",
          "template": "deepseekr1", "preprocessing_num_workers": 16, "overwrite_cache": True,
          "ddp_timeout": 180000000, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": True,
          "plot_loss": True, "report_to": "none", "save_steps": 500, "val_size": 0.1, "eval_steps": 500}
    cfg = validate_config(lf, source="lf.yaml")
    assert cfg.lr_scheduler_type == "cosine" and cfg.val_size == 0.1 and cfg.ddp_timeout == 180000000
    assert "ignoring" not in capsys.readouterr().err


def test_docs_in_sync_with_schema():
    docs = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert docs == config_docs_markdown(), "regenerate: python -m r1tune.config > docs/config.md"
    for name in RunConfig.model_fields:
        assert f"`{name}`" in docs


@pytest.mark.parametrize("extra, message", [
    ({"max_steps": 0}, "max_steps must be a positive number"),
    ({"eval_steps": 10}, "'eval_steps' needs held-out data; set val_size"),
    ({"val_size": 0.1, "early_stopping_patience": 2}, "'early_stopping_patience' needs 'eval_steps'"),
    ({True: 1}, "key True is not a name"),
])
def test_conflicting_or_odd_settings(extra, message):
    with pytest.raises(UserError, match=message):
        validate_config({**BASE, **extra}, source="run.yaml")


def test_override_that_is_not_yaml_is_kept_as_text(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: m\ndataset: d.jsonl\noutput_dir: o\n")
    assert load_config(path, ["dataset=@weird.jsonl"]).dataset == "@weird.jsonl"
