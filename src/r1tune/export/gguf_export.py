"""Export a merged Hugging Face Qwen2 / Llama folder to a GGUF file (llama.cpp, Ollama).

Our own small converter on top of the `gguf` package's GGUFWriter. It follows the
conventions of llama.cpp's `convert_hf_to_gguf.py`:

- metadata under the architecture prefix (`qwen2.` or `llama.`): context_length,
  embedding_length, block_count, feed_forward_length, attention.head_count(_kv),
  rope.freq_base, attention.layer_norm_rms_epsilon;
- llama.cpp tensor names (`token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output`);
- for "llama" the Q and K projections are permuted from Hugging Face's rotate-half
  layout back to the interleaved (GPT-J style) rotary layout llama.cpp expects; qwen2
  uses NeoX-style rotary in llama.cpp and is written unpermuted;
- Llama-3.1 style "llama3" rope scaling becomes a `rope_freqs.weight` tensor;
- `dtype="f16"` stores matrices as float16 and keeps 1-D tensors (norms, biases) float32;
- the tokenizer is written as byte-level BPE ("gpt2") with tokens, token types, merges,
  special token ids and the chat template; `tokenizer.ggml.pre` names the llama.cpp
  pre-tokenizer that splits text as the one transformers really applies does.

`read_gguf_summary` reads a file back for validation; `write_modelfile` writes an
Ollama Modelfile with DeepSeek-R1's prompt format. Files are written atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from r1tune.errors import UserError
from r1tune.fileio import atomic_path, write_text_atomic

SUPPORTED = ("qwen2", "llama")
NOT_SUPPORTED_WHY = {
    "deepseek_v3": ("its multi-head latent attention and mixture-of-experts tensors need a "
                    "different tensor layout (llama.cpp's deepseek2 converter), which r1tune "
                    "does not implement yet; export a Qwen2 or Llama distill instead"),
}
DTYPES = ("f16", "f32")

# Hugging Face per-layer suffix -> llama.cpp per-layer name.
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


# ---------------------------------------------------------------- export

def export_gguf(model_dir, out_path, dtype: str = "f16") -> Path:
    """Write `model_dir` (safetensors + config.json + tokenizer.json) as GGUF to `out_path`."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    config = _load_config(model_dir)
    arch = _check_arch(config)
    if dtype not in DTYPES:
        raise UserError(f"GGUF dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}.")
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            _add_metadata(writer, config, model_dir.name, dtype)
            _add_tokenizer(writer, model_dir, config)
            _add_tensors(writer, model_dir, config, arch, dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()  # flushed and closed before the rename (or the removal on error)
    return out_path


def _load_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir} has no config.json; point the export at a merged model folder.")
    return json.loads(path.read_text(encoding="utf-8"))


def _check_arch(config: dict) -> str:
    model_type = config.get("model_type", "?")
    if model_type in NOT_SUPPORTED_WHY:
        raise UserError(f"GGUF export of model type {model_type!r} is not supported yet: "
                        f"{NOT_SUPPORTED_WHY[model_type]}.")
    if model_type not in SUPPORTED:
        raise UserError(f"GGUF export of model type {model_type!r} is not supported yet; "
                        f"supported: {', '.join(SUPPORTED)}.")
    return model_type


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope(config: dict) -> dict:
    """Rope settings from either transformers 5 `rope_parameters` or older top-level keys."""
    rope = dict(config.get("rope_scaling") or {})
    rope.update(config.get("rope_parameters") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ("default", "llama3"):
        raise UserError(f"GGUF export does not support rope scaling type {kind!r} yet; "
                        "supported: none (default) and llama3.")
    rope["rope_type"] = kind
    return rope


def _add_metadata(writer, config: dict, name: str, dtype: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    if _head_dim(config) != config["hidden_size"] // heads:
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))
    ftype = gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---------------------------------------------------------------- tensors

def _add_tensors(writer, model_dir: Path, config: dict, arch: str, dtype: str) -> None:
    written = set()
    for hf_name, array in _iter_safetensors(model_dir):
        name = _gguf_name(hf_name)
        if name is None:
            continue
        if arch == "llama":
            array = _maybe_permute(name, array, config)
        writer.add_tensor(name, _cast(array, dtype))
        written.add(name)
    _check_complete(written, config)
    if _rope(config)["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(config))


def _iter_safetensors(model_dir: Path):
    """(name, float32 numpy array) for every tensor of every *.safetensors file."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} has no .safetensors weights; save the merged model with "
                        "safe_serialization=True.")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key).float().numpy()


def _gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for a Hugging Face tensor name; None for tensors GGUF does not store."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    match = LAYER_RE.match(hf_name)
    if match and match.group(2) in LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"blk.{layer}.{LAYER_NAMES[part]}.{kind}"
    base, _, kind = hf_name.rpartition(".")
    if base in GLOBAL_NAMES and kind == "weight":
        return f"{GLOBAL_NAMES[base]}.weight"
    raise UserError(f"tensor {hf_name!r} has no GGUF equivalent; export a merged model "
                    "(LoRA adapters and extra heads must be merged or removed first).")


def _maybe_permute(name: str, array: np.ndarray, config: dict) -> np.ndarray:
    """Apply llama.cpp's Q/K permutation for the "llama" architecture."""
    heads = config["num_attention_heads"]
    if ".attn_q." in name:
        return permute_qk(array, heads)
    if ".attn_k." in name:
        return permute_qk(array, config.get("num_key_value_heads") or heads)
    return array


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of each head go from [first halves, second halves] to interleaved pairs."""
    shape = weights.shape
    per_head = shape[0] // n_head
    return (weights.reshape(n_head, 2, per_head // 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    """f16 for matrices when asked; 1-D tensors (norms, biases) always stay float32."""
    if dtype == "f16" and array.ndim > 1:
        return array.astype(np.float16)
    return np.ascontiguousarray(array, dtype=np.float32)


def expected_tensors(config: dict) -> set[str]:
    """Tensor names a complete export holds (biases and rope_freqs not included)."""
    names = {"token_embd.weight", "output_norm.weight"}
    if not config.get("tie_word_embeddings", False):
        names.add("output.weight")
    for i in range(config["num_hidden_layers"]):
        names.update(f"blk.{i}.{part}.weight" for part in LAYER_NAMES.values())
    return names


def _check_complete(written: set, config: dict) -> None:
    missing = sorted(expected_tensors(config) - written)
    if missing:
        raise UserError(f"the model folder lacks {len(missing)} tensors needed for GGUF "
                        f"(first: {missing[0]}); is the safetensors checkpoint complete?")


def _llama3_rope_factors(config: dict) -> np.ndarray:
    """Llama-3.1 rope scaling as per-frequency factors (llama.cpp's rope_freqs tensor)."""
    rope = _rope(config)
    dim, base = _head_dim(config), float(rope["rope_theta"])
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_len = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


# ---------------------------------------------------------------- tokenizer

def _add_tokenizer(writer, model_dir: Path, config: dict) -> None:
    tok_json = _read_json(model_dir / "tokenizer.json", "tokenizer.json")
    tok_cfg = _read_json(model_dir / "tokenizer_config.json", None) or {}
    if tok_json["model"].get("type") != "BPE":
        raise UserError("GGUF export supports byte-level BPE tokenizers only "
                        f"(tokenizer.json has {tok_json['model'].get('type')!r}).")
    tokens, types = _vocab(tok_json, config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(_effective_pre_tokenizer(model_dir, tok_json),
                                                 tok_json.get("pre_tokenizer") or {}))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tok_json))
    _add_special_ids(writer, tokens, tok_cfg, config)
    template = _chat_template(model_dir, tok_cfg)
    if template:
        writer.add_chat_template(template)


def _read_json(path: Path, required_name: str | None):
    if not path.is_file():
        if required_name:
            raise UserError(f"{path.parent} has no {required_name}; save the tokenizer with the model.")
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _vocab(tok_json: dict, n_embd_rows: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types, padded with [PADn] up to the embedding rows."""
    from gguf import TokenType

    by_id = {i: (t, TokenType.NORMAL) for t, i in tok_json["model"]["vocab"].items()}
    for added in tok_json.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    size = max(by_id) + 1
    if size > n_embd_rows:
        raise UserError(f"the tokenizer has {size} tokens but the model only {n_embd_rows} "
                        "embedding rows; resize the embeddings before exporting.")
    pairs = [by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(n_embd_rows)]
    return [t for t, _ in pairs], [int(k) for _, k in pairs]


def _merges(tok_json: dict) -> list[str]:
    """Merges as "a b" strings (tokenizer.json stores strings or [a, b] pairs)."""
    return [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]


# Pre-tokenizer regexes as Hugging Face tokenizer.json files spell them.
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _effective_pre_tokenizer(model_dir: Path, tok_json: dict) -> dict:
    """The pre-tokenizer transformers really applies to this folder (what the model saw).

    transformers 5 may replace tokenizer.json's pre-tokenizer with its own: a qwen2 folder
    loads as Qwen2Tokenizer, which always splits with Qwen2's regex. Falls back to the
    file's pre-tokenizer when the tokenizer cannot be loaded.
    """
    try:
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(str(model_dir)).backend_tokenizer
        return json.loads(backend.to_str()).get("pre_tokenizer") or {}
    except Exception:  # no transformers, or a folder it cannot load: trust the file
        return tok_json.get("pre_tokenizer") or {}


def _pre_tokenizer_name(pre: dict, file_pre: dict | None = None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a Hugging Face pre-tokenizer (its JSON form).

    llama.cpp splits text with a fixed regex per name before BPE, so the name must give the
    same pieces as the Hugging Face pre-tokenizer, or tokens that merge across a piece
    boundary come out differently. `pre` is the pre-tokenizer transformers applies,
    `file_pre` tokenizer.json's, tried next. Known layouts map exactly: Qwen2's regex ->
    "qwen2" (also DeepSeek-R1's Qwen distills); Llama 3's -> "llama-bpe" (also the Llama
    distills); single digits then GPT-2's regex (r1tune's tiny tokenizer) -> "refact";
    GPT-2's byte-level regex alone -> "gpt-2". Other layouts get a guess from how they
    split digits.
    """
    for candidate in (pre, file_pre):
        name = _exact_pre_name(candidate or {})
        if name:
            return name
    text = json.dumps(file_pre if file_pre is not None else pre)
    if '"individual_digits": true' in text or "\\\\p{N}|" in text:
        return "qwen2"
    if "\\\\p{N}{1,3}" in text:
        return "llama-bpe"
    return "gpt-2"


def _exact_pre_name(pre: dict) -> str | None:
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return {QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe"}.get(regex)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and steps[1].get("use_regex", True):
        return "refact"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    return None


def _add_special_ids(writer, tokens: list[str], tok_cfg: dict, config: dict) -> None:
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id)):
        token_id = _special_id(key, tokens, tok_cfg, config)
        if token_id is not None:
            add(token_id)
    # The chat template writes BOS itself; adding another would double it.
    writer.add_add_bos_token(bool(tok_cfg.get("add_bos_token", False)))
    writer.add_add_eos_token(bool(tok_cfg.get("add_eos_token", False)))


def _special_id(key: str, tokens: list[str], tok_cfg: dict, config: dict) -> int | None:
    text = tok_cfg.get(f"{key}_token")
    if isinstance(text, dict):
        text = text.get("content")
    if text in tokens:
        return tokens.index(text)
    value = config.get(f"{key}_token_id")
    return value[0] if isinstance(value, list) else value


def _chat_template(model_dir: Path, tok_cfg: dict) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


# ---------------------------------------------------------------- reading back

def read_gguf_summary(path) -> dict:
    """Architecture, tensors, key metadata and tokenizer facts of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {name: _field_value(field) for name, field in reader.fields.items()
              if not name.startswith("GGUF.")}
    arch = fields.get("general.architecture")
    template = fields.get("tokenizer.chat_template")
    return {
        "architecture": arch,
        "tensor_count": len(reader.tensors),
        "tensor_names": [t.name for t in reader.tensors],
        "tensor_shapes": {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors},
        "tensor_types": {t.name: t.tensor_type.name for t in reader.tensors},
        "has_chat_template": bool(template),
        "chat_template": template,
        "vocab_size": len(fields.get("tokenizer.ggml.tokens") or []),
        "merges_count": len(fields.get("tokenizer.ggml.merges") or []),
        "metadata": {k: v for k, v in fields.items() if not _is_big_array(k)},
    }


def _field_value(field):
    try:
        return field.contents()
    except Exception:  # unusual field layouts: leave them out of the summary
        return None


def _is_big_array(key: str) -> bool:
    return key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def read_gguf_tensor(path, name: str) -> np.ndarray:
    """One tensor's data in Hugging Face (row-major) shape, for checks."""
    from gguf import GGUFReader

    for tensor in GGUFReader(str(path)).tensors:
        if tensor.name == name:
            return np.array(tensor.data).reshape(tuple(int(d) for d in reversed(tensor.shape)))
    raise KeyError(name)


# ---------------------------------------------------------------- Ollama

MODELFILE_TEMPLATE = (
    "{{BOS}}{{- if .System }}{{ .System }}{{ end }}\n"
    "{{- range $i, $_ := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
    "{{- if eq .Role \"user\" }}{{USER}}{{ .Content }}\n"
    "{{- else if eq .Role \"assistant\" }}{{ASSISTANT}}{{ .Content }}"
    "{{- if not $last }}{{EOS}}{{- end }}\n"
    "{{- end }}\n"
    "{{- if and $last (ne .Role \"assistant\") }}{{GENERATION}}{{ end }}\n"
    "{{- end }}"
)


def write_modelfile(gguf_path, out_path, tokenizer) -> Path:
    """Write an Ollama Modelfile for `gguf_path` with DeepSeek-R1's prompt format.

    `tokenizer` is a Hugging Face tokenizer (or a folder holding one); its BOS/EOS
    text and its generation prompt (e.g. "<｜Assistant｜><think>\\n") are used. The
    template starts with BOS unless the GGUF says the runtime adds BOS itself
    (`tokenizer.ggml.add_bos_token`, true for e.g. the official R1 distills), which
    would otherwise double it.
    """
    from r1tune.data import templates as T

    tokenizer = _as_tokenizer(tokenizer)
    gguf_path, out_path = Path(gguf_path), Path(out_path)
    bos, eos = tokenizer.bos_token or T.BOS, tokenizer.eos_token or T.EOS
    if _gguf_adds_bos(gguf_path):
        bos = ""
    template = (MODELFILE_TEMPLATE.replace("{{BOS}}", bos).replace("{{EOS}}", eos)
                .replace("{{USER}}", T.USER).replace("{{ASSISTANT}}", T.ASSISTANT)
                .replace("{{GENERATION}}", _generation_prompt(tokenizer)))
    text = (f"FROM {_relative_from(gguf_path, out_path)}\n\n"
            f'TEMPLATE """{template}"""\n\n'
            f'PARAMETER stop "{eos}"\n'
            f'PARAMETER stop "{T.USER}"\n')
    return write_text_atomic(out_path, text)


def _gguf_adds_bos(gguf_path: Path) -> bool:
    if not gguf_path.is_file():
        return False
    return bool(read_gguf_summary(gguf_path)["metadata"].get("tokenizer.ggml.add_bos_token", False))


def _as_tokenizer(tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def _generation_prompt(tokenizer) -> str:
    """What the tokenizer's template appends after a user turn; "<｜Assistant｜>" if unknown."""
    from r1tune.data import templates as T

    marker = "\u2063probe\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}],
                                             add_generation_prompt=True, tokenize=False)
    except Exception:  # no template, or one that needs more than a user turn
        return T.ASSISTANT
    tail = text.split(marker, 1)[-1] if marker in text else ""
    return tail if tail.startswith(T.ASSISTANT) else T.ASSISTANT


def _relative_from(gguf_path: Path, out_path: Path) -> str:
    rel = os.path.relpath(gguf_path.resolve(), out_path.resolve().parent)
    return rel if rel.startswith(("..", "/")) else f"./{rel}"
