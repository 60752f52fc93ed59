"""`r1tune export CONFIG.yaml`: merge the adapter(s) the config names into their base, save a plain
transformers model with a model card, prove the merged model reloads to the same logits (exit 1 if it
does not), and write the copies the export_* keys ask for.

The config is a finished run (output_dir), or LLaMA-Factory's export YAML: model_name_or_path with
adapter_name_or_path (all adapters merged, in order), or alone (a re-save with a card)."""

from __future__ import annotations

from pathlib import Path

import torch

from r1tune.config import RunConfig, missing_key_message
from r1tune.errors import UserError
from r1tune.export.merge import PARITY_LIMIT, merge_to_folder, safetensors_bytes
from r1tune.export.modelcard import model_card
from r1tune.models.configured import load_configured, run_folder
from r1tune.models.loading import read_adapter_base
from r1tune.models.methods import require_adapter_folders
from r1tune.models.run_loading import check_mergeable
from r1tune.ui import console


def run_export(cfg: RunConfig) -> int:
    final, loaded, passed = write_merged(cfg)
    tokenizer = loaded.tokenizer
    if cfg.export_onnx:
        passed &= export_onnx_copy(final)
    if cfg.export_gguf:
        export_gguf_copy(final, tokenizer)
    if cfg.export_int8 or cfg.export_quantization_bit:
        from r1tune.export.evalset import export_eval_set

        evalset = export_eval_set(cfg, tokenizer, loaded.run_dir)
        if cfg.export_int8:
            export_int8_copy(final, evalset)
        if cfg.export_quantization_bit:
            passed &= export_bnb_copy(final, cfg.export_quantization_bit, evalset)
    return 0 if passed else 1


def write_merged(cfg: RunConfig):
    final = check_export(cfg)
    device = merge_device(cfg.export_device)
    loaded = load_configured(cfg, quantized=False)  # QLoRA merges into a full-precision base
    card = model_card(loaded.run_dir, loaded.base, cfg.model_license, loaded.adapters, loaded.label)
    result = merge_to_folder(loaded.model, loaded.tokenizer, final, cfg.export_size, {"README.md": card}, device)
    loaded.model = None  # the copies reload the folder; free the merged weights first
    template = "with chat template" if loaded.tokenizer.chat_template else "(no chat template)"
    console.print(f"merged model: {final} ({_source(loaded)}; {result.shards} safetensors shard(s), "
                  f"{_mb(safetensors_bytes(final))} MB), tokenizer {template}, generation_config.json, "
                  "README.md model card")
    console.print(f"parity {'PASS' if result.passed else 'FAIL'}: reloaded with plain transformers, max abs "
                  f"logits difference {result.max_abs_diff:.2e} against r1tune's unmerged model "
                  f"(limit {PARITY_LIMIT:g}, fp32)")
    return final, loaded, result.passed


def check_export(cfg: RunConfig) -> Path:
    """Everything a user can get wrong, checked before the model loads; returns the export folder."""
    run_dir = run_folder(cfg)
    final = export_target(cfg, run_dir)
    adapters = [] if run_dir else require_adapter_folders(cfg.adapter_name_or_path)
    for folder in [run_dir] if run_dir else adapters:
        check_mergeable(Path(folder))
    refuse_replacing_sources(final, [run_dir, read_adapter_base(run_dir) if run_dir else None,
                                     cfg.model_name_or_path, *adapters])
    return final


def _source(loaded) -> str:
    if loaded.run_dir is not None:
        return f"run {loaded.run_dir}"
    if loaded.adapters:
        return f"{len(loaded.adapters)} adapter(s) merged into {loaded.base}"
    return f"{loaded.base} re-saved"


def export_target(cfg: RunConfig, run_dir: Path | None) -> Path:
    if cfg.export_dir:
        return Path(cfg.export_dir)
    if run_dir is not None:
        return run_dir / "merged"
    raise UserError(f"{missing_key_message(cfg.source, 'export_dir')} (without output_dir there is no run "
                    "folder to put the merged model in)")


def refuse_replacing_sources(final: Path, sources: list) -> None:
    """The export replaces export_dir as a whole: it must not be, or hold, a folder the export reads."""
    for source in filter(None, sources):
        path = Path(source).expanduser()
        if path.exists() and path.resolve().is_relative_to(final.resolve()):
            raise UserError(f"export_dir '{final}' holds '{source}', which this export reads and would replace; "
                            "choose another export_dir")


def merge_device(choice: str) -> str:
    """export_device: 'cpu', or 'auto' (LLaMA-Factory's value): CUDA when there is one."""
    if choice == "auto" and torch.cuda.is_available():
        return "cuda"
    if choice == "auto":
        console.print("note: export_device auto: no CUDA device here, merging on the CPU")
    return "cpu"


def _mb(size_bytes: int) -> str:
    return f"{size_bytes / 2**20:,.1f}"


def _change(value: float, reference: float) -> str:
    return f"{(value / reference - 1) * 100:+.1f} %"


def export_int8_copy(final: Path, evalset) -> None:
    from r1tune.export.int8 import quantize_int8

    r = quantize_int8(final, final / "int8", evalset)
    console.print(f"int8: {r.path} ({_mb(r.size_bytes)} MB vs {_mb(r.fp32_size_bytes)} MB fp32), "
                  f"{r.tokens_per_s:,.0f} vs {r.fp32_tokens_per_s:,.0f} tokens/s greedy, {r.metric_name} on "
                  f"{r.metric_data} {r.metric:.3f} vs {r.fp32_metric:.3f} ({_change(r.metric, r.fp32_metric)})")


def export_bnb_copy(final: Path, bits: int, evalset) -> bool:
    from r1tune.export.bnb_export import quantize_bnb

    r = quantize_bnb(final, final / f"bnb-{bits}bit", bits, evalset)
    console.print(f"bnb-{bits}bit {'PASS' if r.passed else 'FAIL'}: {r.path} ({_mb(r.size_bytes)} MB vs "
                  f"{_mb(r.fp32_size_bytes)} MB fp32; {r.quantized_layers} linear layers quantized, {r.fp32_share:.0%} "
                  f"of the weights stay fp32), reloaded with plain transformers; perplexity on {r.data} "
                  f"{r.perplexity:.3f} vs {r.fp32_perplexity:.3f} fp32 ({_change(r.perplexity, r.fp32_perplexity)})")
    for note in r.notes:
        console.print(f"note: {note}")
    return r.passed


def export_onnx_copy(final: Path) -> bool:
    from r1tune.export.onnx_export import export_onnx

    report = export_onnx(final, final / "onnx")
    ok = report.max_abs_diff <= PARITY_LIMIT
    console.print(f"onnx {'PASS' if ok else 'FAIL'}: {report.path} ({report.size_bytes / 2**20:,.1f} MB, "
                  f"{report.exporter} exporter); onnxruntime vs PyTorch max abs logits difference {report.max_abs_diff:.2e}")
    return ok


def export_gguf_copy(final: Path, tokenizer) -> None:
    from r1tune.export.gguf_export import export_gguf, read_gguf_summary, write_modelfile

    path = export_gguf(final, final / "model.gguf")
    summary = read_gguf_summary(path)
    modelfile = write_modelfile(path, final / "Modelfile", tokenizer)
    console.print(f"gguf: {path} ({path.stat().st_size / 2**20:,.1f} MB, {summary['architecture']}, "
                  f"{summary['tensor_count']} tensors, vocabulary {summary['vocab_size']:,}, chat template "
                  f"{'kept' if summary['has_chat_template'] else 'missing'}); Ollama: {modelfile}")
