"""`r1tune export RUN.yaml`: merge the run's adapter into its base, save a plain transformers model
with a model card, and prove the merged model reloads to the same logits (exit 1 if it does not)."""

from __future__ import annotations

from pathlib import Path

from r1tune.config import RunConfig
from r1tune.export.merge import PARITY_LIMIT, check_mergeable, merge_to_folder
from r1tune.export.modelcard import model_card
from r1tune.models.loading import read_adapter_base
from r1tune.ui import console


def run_export(cfg: RunConfig) -> int:
    from r1tune.serve.chat import load_for_chat

    run_dir = Path(cfg.output_dir)
    check_mergeable(run_dir)
    final = Path(cfg.export_dir or run_dir / "merged")
    model, tokenizer = load_for_chat(str(run_dir), quantized=False)  # QLoRA merges into a full-precision base
    base = read_adapter_base(run_dir) or cfg.model_name_or_path
    card = model_card(run_dir, base, cfg.model_license)
    result = merge_to_folder(model, tokenizer, final, cfg.export_size, {"README.md": card})
    size = sum(f.stat().st_size for f in final.glob("*.safetensors")) / 2**20
    console.print(f"merged model: {final} ({result.shards} safetensors shard(s), {size:,.1f} MB), tokenizer with "
                  "chat template, generation_config.json, README.md model card")
    verdict = "PASS" if result.passed else "FAIL"
    console.print(f"parity {verdict}: reloaded with plain transformers, max abs logits difference "
                  f"{result.max_abs_diff:.2e} against r1tune's unmerged model (limit {PARITY_LIMIT:g}, fp32)")
    passed = result.passed
    if cfg.export_onnx:
        passed &= export_onnx_copy(final)
    if cfg.export_gguf:
        export_gguf_copy(final, tokenizer)
    if cfg.export_int8:
        export_int8_copy(final)
    return 0 if passed else 1


def export_int8_copy(final: Path) -> None:
    from r1tune.export.int8 import quantize_int8

    r = quantize_int8(final, final / "int8")
    console.print(f"int8: {r.path} ({r.size_bytes / 2**20:,.1f} MB vs {r.fp32_size_bytes / 2**20:,.1f} MB fp32), "
                  f"{r.tokens_per_s:,.0f} vs {r.fp32_tokens_per_s:,.0f} tokens/s greedy, {r.metric_name} "
                  f"{r.metric:.3f} vs {r.fp32_metric:.3f} ({(r.metric / r.fp32_metric - 1) * 100:+.1f} %)")


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
