"""LLaMA-Factory's export-only YAML (model_name_or_path + adapter_name_or_path, no dataset / output_dir)
through the real CLI; load_configured; export_device; bitsandbytes copies; held-out perplexity."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from r1tune.cli import main
from r1tune.config import validate_config
from r1tune.data.encode import IGNORE
from r1tune.errors import UserError
from r1tune.export.merge import logits_of, probe_batch
from r1tune.models.configured import load_configured
from r1tune.train.stages.sft import run_sft
from tests.conftest import PARITY, make_cfg

LF_YAML = """\
model_name_or_path: {model}
adapter_name_or_path: {adapters}   # optional, comma-separated
template: deepseekr1
finetuning_type: lora
export_dir: {export_dir}
export_size: 2
export_device: cpu
export_legacy_format: false
"""


@pytest.fixture(scope="module")
def stack(tiny_qwen, tmp_path_factory):
    """Two LoRA adapters trained here: b is trained over the base with a merged in (as LLaMA-Factory stacks them)."""
    root = tmp_path_factory.mktemp("stack")
    data = root / "parity.jsonl"
    data.write_text("\n".join(PARITY.read_text(encoding="utf-8").splitlines()[:64]) + "\n", encoding="utf-8")
    keys = dict(max_steps=2, lora_rank=4, learning_rate=3e-2, val_size=8, bf16=False)
    run_sft(make_cfg(tiny_qwen, data, root / "lora-a", **keys))
    run_sft(make_cfg(tiny_qwen, data, root / "lora-b", adapter_name_or_path=str(root / "lora-a"),
                     create_new_adapter=True, **keys))
    return root / "lora-a", root / "lora-b"


def reference_stack(base, a, b=None):
    """The PEFT stack built with peft alone: a merged into the base, b on top unmerged."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), a)
    model = model.merge_and_unload()
    return PeftModel.from_pretrained(model, b) if b else model


def max_diff(model, other, seed=3):
    batch = probe_batch(model.config.vocab_size, seed=seed)
    return (logits_of(model, batch) - logits_of(other, batch)).abs().max().item()


def write_lf_yaml(path, model, adapters, export_dir, extra: str = ""):
    path.write_text(LF_YAML.format(model=model, adapters=",".join(map(str, adapters)), export_dir=export_dir) + extra,
                    encoding="utf-8")
    return path


def flat(text: str) -> str:
    """Console output without the terminal's line wrapping."""
    return re.sub(r"\s+", " ", text)


def test_lf_export_yaml_merges_every_adapter_in_order(stack, tiny_qwen, tmp_path, capsys):
    a, b = stack
    merged = tmp_path / "exports" / "merged"
    config = write_lf_yaml(tmp_path / "merge.yaml", tiny_qwen, [a, b], merged)
    assert main(["export", str(config)]) == 0
    out = flat(capsys.readouterr().out)
    assert "2 adapter(s) merged into" in out and "parity PASS" in out
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)  # nothing from r1tune
    assert max_diff(plain, reference_stack(tiny_qwen, a, b)) <= 1e-4
    assert max_diff(plain, reference_stack(tiny_qwen, a)) > 1e-3  # b really is in it
    card = (merged / "README.md").read_text()
    assert f"base_model: {tiny_qwen}" in card and f"`{a}`, `{b}`" in card
    assert "Exported without an r1tune run" in card
    assert "<｜Assistant｜>" in (merged / "chat_template.jinja").read_text()  # template: deepseekr1
    assert not list(merged.parent.glob(".tmp-*"))


def test_load_configured_keeps_the_last_adapter_unmerged(stack, tiny_qwen, tmp_path):
    a, b = stack
    cfg = validate_config({"model_name_or_path": str(tiny_qwen), "adapter_name_or_path": f"{a},{b}"})
    loaded = load_configured(cfg)
    assert isinstance(loaded.model, PeftModel) and loaded.run_dir is None
    assert (loaded.label, loaded.base, loaded.adapters) == ("lora-b", str(tiny_qwen.resolve()), [str(a), str(b)])
    reference = reference_stack(tiny_qwen, a, b)
    assert max_diff(loaded.model, reference) <= 1e-5
    merged = load_configured(cfg, merge_all=True).model
    assert not isinstance(merged, PeftModel) and max_diff(merged, reference) <= 1e-4
    run = load_configured(make_cfg(tiny_qwen, PARITY, b))  # a finished run: its own folder
    assert run.run_dir == b and run.label == "lora-b" and max_diff(run.model, reference) <= 1e-5


def test_adapter_of_another_base_warns_then_fails_clearly(stack, tiny_ds, capsys):
    cfg = validate_config({"model_name_or_path": str(tiny_ds), "adapter_name_or_path": str(stack[0])})
    with pytest.raises(UserError, match="does not fit this base model"):
        load_configured(cfg)
    assert "was trained over" in capsys.readouterr().err


def test_chat_takes_the_config_and_its_overrides(stack, tiny_qwen, tmp_path, monkeypatch):
    import io

    from r1tune.data.reasoning import split_output
    from r1tune.serve import chat

    a, b = stack
    config = write_lf_yaml(tmp_path / "chat.yaml", tiny_qwen, [a, b], tmp_path / "unused")
    seen, printed, replies, real_reply = [], io.StringIO(), [], chat.reply
    monkeypatch.setattr(chat, "reply", lambda model, *args, **kw: (seen.append(model), replies.append(real_reply(
        model, *args, **{**kw, "out": printed})))[1])
    assert main(["chat", str(config), "--prompt", "Is 7 even or odd?", "--max-new-tokens", "6"]) == 0
    reasoning, answer = split_output(replies[0], opened=True)  # what serve returns for the same text
    assert printed.getvalue().startswith("[reasoning]\n") and (reasoning or "") in printed.getvalue()
    assert answer in printed.getvalue()
    assert main(["chat", str(config), f"adapter_name_or_path={a}", "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert max_diff(seen[0], reference_stack(tiny_qwen, a, b)) <= 1e-5
    assert max_diff(seen[1], reference_stack(tiny_qwen, a)) <= 1e-5


def export_base_only(model, out, capsys, extra: str) -> str:
    """`r1tune export` of a YAML naming only a model and export_dir (plus `extra` lines); the printed text."""
    config = out.parent / "base-only.yaml"
    config.write_text(f"model_name_or_path: {model}\nexport_dir: {out}\n{extra}", encoding="utf-8")
    assert main(["export", str(config)]) == 0
    return flat(capsys.readouterr().out)


def test_plain_resave_and_export_device_auto(tiny_qwen, tmp_path, capsys):
    out = tmp_path / "resaved"
    printed = export_base_only(tiny_qwen, out, capsys, "export_device: auto\n")
    if not torch.cuda.is_available():
        assert "export_device auto: no CUDA device here, merging on the CPU" in printed
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32)
    assert max_diff(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), base) == 0.0
    assert "re-saved by r1tune export (no adapter)" in (out / "README.md").read_text()


def test_export_device_auto_picks_cuda_when_there_is_one(monkeypatch):
    from r1tune.export.run import merge_device

    assert merge_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert merge_device("auto") == "cuda" and merge_device("cpu") == "cpu"


BAD = {  # command, YAML lines (after model_name_or_path), expected message
    "export without export_dir": ("export", "", r"required key 'export_dir' is missing; add it to the file"),
    "train without dataset": ("train", "", r"required key 'dataset' is missing; add it to the file \(r1tune train"),
    "train without output_dir": ("train", "dataset: d.jsonl\n", r"required key 'output_dir' is missing"),
    "eval without output_dir": ("eval", "", r"required key 'output_dir' is missing; add it to the file \(r1tune eval"),
    "data without dataset": ("data check", "", r"required key 'dataset' is missing; add it to the file \(r1tune data"),
    "unknown export_device": ("export", "export_dir: e\nexport_device: cuda\n", r"'export_device'.*'cpu' or 'auto'"),
    "adapter without config": ("export", "export_dir: e\nadapter_name_or_path: __TMP__\n", "no adapter_config.json"),
    "export_dir holds the adapter": ("export", "export_dir: __ADAPTER__/..\nadapter_name_or_path: __ADAPTER__\n",
                                     "which this export reads and would replace"),
    "output_dir not trained": ("export", "output_dir: __TMP__\n", r"output_dir '.*' holds no trained model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_config_mistakes_exit_2_with_one_line_and_write_nothing(case, stack, tiny_qwen, tmp_path, capsys):
    command, lines, expected = BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    lines = lines.replace("__TMP__", str(work)).replace("__ADAPTER__", str(stack[0]))
    config = tmp_path / "lf.yaml"
    config.write_text(f"model_name_or_path: {tiny_qwen}\n{lines}", encoding="utf-8")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main([*command.split(), str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(expected, err[0]), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_calibration_keys_are_accepted_without_effect(capsys):
    cfg = validate_config({"model_name_or_path": "m", "export_dir": "e", "export_quantization_bit": 4,
                           "export_quantization_dataset": "c4_demo", "export_quantization_nsamples": 128,
                           "export_quantization_maxlen": 1024}, source="q.yaml")
    assert cfg.export_quantization_bit == 4
    err = capsys.readouterr().err
    assert err.count("needs no calibration data") == 3 and "ignoring 'export_quantization_dataset'" in err


def test_bnb_copy_reloads_with_plain_transformers_and_reports_held_out_perplexity(stack, tmp_path, capsys):
    from bitsandbytes.nn import Linear4bit

    from r1tune.config import load_config

    run_file, merged = stack[1] / "r1tune_config.yaml", tmp_path / "merged"  # lora-b has val_size 8
    assert main(["export", str(run_file), f"export_dir={merged}", "export_quantization_bit=4"]) == 0
    out = flat(capsys.readouterr().out)
    line = re.search(r"bnb-4bit PASS: .* perplexity on 8 held-out samples ([\d.]+) vs ([\d.]+) fp32", out)
    assert line and math.isfinite(float(line.group(1))), out
    folder = merged / "bnb-4bit"
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["load_in_4bit"] and quant["bnb_4bit_quant_type"] == "nf4" and quant["bnb_4bit_use_double_quant"]
    plain = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, bitsandbytes installed
    assert any(isinstance(m, Linear4bit) for m in plain.modules())
    assert not [f for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".pth")]
    expected = _held_out_perplexity(merged, load_config(run_file))
    assert float(line.group(2)) == pytest.approx(expected, rel=1e-3)  # printed with 3 decimals


def _held_out_perplexity(model_dir, cfg) -> float:
    """exp(mean loss) over the trained labels of the held-out samples, one sample at a time."""
    from transformers import AutoTokenizer

    from r1tune.data.prepare import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll = count = 0
    for example in prepare_data(cfg, tokenizer, say=lambda *a, **k: None).val:
        assert IGNORE in example.labels  # the prompt is not scored
        ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
        n = int((labels[:, 1:] != IGNORE).sum())
        with torch.no_grad():
            nll += model(input_ids=ids, labels=labels).loss.item() * n
        count += n
    return math.exp(nll / count)


def test_deepseek_bnb_8bit_keeps_fused_experts_fp32(tiny_ds, tmp_path, capsys):
    out = tmp_path / "ds"
    printed = export_base_only(tiny_ds, out, capsys, "export_quantization_bit: 8\n")
    assert "perplexity on 4 fixed sentences (no r1tune run in the config)" in printed
    assert "fused routed experts (mlp.experts.*) are not nn.Linear layers and stay fp32" in printed
    plain = AutoModelForCausalLM.from_pretrained(out / "bnb-8bit")
    experts = plain.model.layers[1].mlp.experts
    assert experts.gate_up_proj.dtype == torch.float32 and experts.down_proj.dtype == torch.float32
    assert plain.model.layers[1].self_attn.q_a_proj.weight.dtype == torch.int8


def test_missing_bitsandbytes_is_a_clear_error(tiny_qwen, tmp_path, monkeypatch):
    from r1tune.export.bnb_export import quantize_bnb

    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    with pytest.raises(UserError, match="'export_quantization_bit' needs bitsandbytes"):
        quantize_bnb(tiny_qwen, tmp_path / "bnb", 4)
    assert not list(tmp_path.iterdir())


def test_eval_set_says_which_data_it_is(tiny_qwen, tokenizer, parity_file, tmp_path):
    from r1tune.export.evalset import export_eval_set

    def described(**keys):
        return export_eval_set(make_cfg(tiny_qwen, parity_file, tmp_path, **keys), tokenizer, tmp_path).description

    assert described(val_size=8) == "8 held-out samples"
    assert described() == "4 fixed sentences (the run has no held-out data)"
    assert described(val_size=8, dataset=str(tmp_path / "moved.jsonl")) == \
        "4 fixed sentences (the run's held-out data could not be read)"
    assert export_eval_set(None, tokenizer, None).description == "4 fixed sentences (no r1tune run in the config)"
