"""GGUF export: metadata, tensors, tokenizer and chat template read back with GGUFReader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")

from r1tune.errors import UserError  # noqa: E402
from r1tune.export.gguf_export import (  # noqa: E402
    expected_tensors, export_gguf, read_gguf_summary, read_gguf_tensor, write_modelfile)
from r1tune.models.tiny import build_tiny  # noqa: E402

EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("models") / "llama", "llama", hidden_size=64, num_layers=2)


@pytest.fixture(scope="module")
def qwen_f32(tiny_qwen, tmp_path_factory) -> Path:
    return export_gguf(tiny_qwen, tmp_path_factory.mktemp("gguf") / "qwen-f32.gguf", dtype="f32")


@pytest.fixture(scope="module")
def llama_f16(tiny_llama, tmp_path_factory) -> Path:
    return export_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "llama-f16.gguf")


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def _weights(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K permutation, written independently of the exporter."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_metadata(summary: dict, cfg: dict, arch: str) -> None:
    meta = summary["metadata"]
    assert summary["architecture"] == arch
    assert meta[f"{arch}.context_length"] == cfg["max_position_embeddings"]
    assert meta[f"{arch}.embedding_length"] == cfg["hidden_size"]
    assert meta[f"{arch}.block_count"] == cfg["num_hidden_layers"]
    assert meta[f"{arch}.feed_forward_length"] == cfg["intermediate_size"]
    assert meta[f"{arch}.attention.head_count"] == cfg["num_attention_heads"]
    assert meta[f"{arch}.attention.head_count_kv"] == cfg["num_key_value_heads"]
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(theta)
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])


def _check_tokenizer(summary: dict, folder: Path, cfg: dict) -> None:
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    meta = summary["metadata"]
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert summary["vocab_size"] == cfg["vocab_size"]
    assert summary["merges_count"] == len(tok["model"]["merges"])
    assert meta["tokenizer.ggml.bos_token_id"] == cfg["bos_token_id"]
    assert meta["tokenizer.ggml.eos_token_id"] == cfg["eos_token_id"]
    assert meta["tokenizer.ggml.padding_token_id"] == cfg["pad_token_id"]
    assert summary["has_chat_template"]
    assert summary["chat_template"] == (folder / "chat_template.jinja").read_text(encoding="utf-8")


def test_qwen2_f32_metadata_and_tokenizer(tiny_qwen, qwen_f32):
    summary, cfg = read_gguf_summary(qwen_f32), _config(tiny_qwen)
    _check_metadata(summary, cfg, "qwen2")
    _check_tokenizer(summary, tiny_qwen, cfg)
    assert summary["metadata"]["general.file_type"] == 0


def test_qwen2_tensors_match_safetensors_exactly(tiny_qwen, qwen_f32):
    summary, cfg, weights = read_gguf_summary(qwen_f32), _config(tiny_qwen), _weights(tiny_qwen)
    expected = expected_tensors(cfg) | {f"blk.{i}.attn_{p}.bias" for i in range(2) for p in "qkv"}
    assert set(summary["tensor_names"]) == expected
    assert summary["tensor_count"] == len(expected)
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
             "output_norm.weight": "model.norm.weight",
             "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
             "blk.1.attn_k.bias": "model.layers.1.self_attn.k_proj.bias",
             "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
             "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight"}
    for name, hf_name in pairs.items():
        assert summary["tensor_shapes"][name] == weights[hf_name].shape
        np.testing.assert_array_equal(read_gguf_tensor(qwen_f32, name), weights[hf_name])


def test_token_types_mark_special_and_added_tokens(tiny_qwen, qwen_f32):
    from gguf import GGUFReader

    fields = GGUFReader(str(qwen_f32)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[tokens.index(EOS)] == 3  # CONTROL
    assert types[tokens.index("<think>")] == 4  # USER_DEFINED
    assert types[tokens.index("Ġt")] == 1  # NORMAL


def test_llama_f16_metadata_shapes_and_permutation(tiny_llama, llama_f16):
    summary, cfg, weights = read_gguf_summary(llama_f16), _config(tiny_llama), _weights(tiny_llama)
    _check_metadata(summary, cfg, "llama")
    _check_tokenizer(summary, tiny_llama, cfg)
    assert set(summary["tensor_names"]) == expected_tensors(cfg)
    assert summary["metadata"]["general.file_type"] == 1
    assert summary["tensor_types"]["blk.0.ffn_up.weight"] == "F16"
    assert summary["tensor_types"]["blk.0.attn_norm.weight"] == "F32"
    for i in range(cfg["num_hidden_layers"]):
        q = read_gguf_tensor(llama_f16, f"blk.{i}.attn_q.weight").astype(np.float32)
        k = read_gguf_tensor(llama_f16, f"blk.{i}.attn_k.weight").astype(np.float32)
        hf_q = weights[f"model.layers.{i}.self_attn.q_proj.weight"]
        hf_k = weights[f"model.layers.{i}.self_attn.k_proj.weight"]
        assert not np.allclose(q, hf_q, atol=1e-3)  # permuted, not copied
        np.testing.assert_allclose(_unpermute(q, cfg["num_attention_heads"]), hf_q, atol=1e-3)
        np.testing.assert_allclose(_unpermute(k, cfg["num_key_value_heads"]), hf_k, atol=1e-3)
        up = read_gguf_tensor(llama_f16, f"blk.{i}.ffn_up.weight").astype(np.float32)
        np.testing.assert_allclose(up, weights[f"model.layers.{i}.mlp.up_proj.weight"], atol=1e-3)


def test_modelfile_has_template_and_stops(tiny_qwen, qwen_f32, tmp_path):
    from transformers import AutoTokenizer

    path = write_modelfile(qwen_f32, tmp_path / "Modelfile", AutoTokenizer.from_pretrained(tiny_qwen))
    text = path.read_text(encoding="utf-8")
    assert text.startswith("FROM ")
    assert f'PARAMETER stop "{EOS}"' in text
    assert f'PARAMETER stop "{USER}"' in text
    assert 'TEMPLATE """<｜begin▁of▁sentence｜>' in text
    assert f"{USER}{{{{ .Content }}}}" in text
    assert "<｜Assistant｜><think>\n" in text  # the tokenizer's generation prompt
    assert not list(tmp_path.glob(".*.tmp"))


def test_modelfile_from_is_relative(tiny_qwen, qwen_f32):
    path = write_modelfile(qwen_f32, qwen_f32.parent / "Modelfile", tiny_qwen)
    assert path.read_text(encoding="utf-8").startswith(f"FROM ./{qwen_f32.name}\n")


def test_deepseek_v3_is_rejected(tiny_ds, tmp_path):
    with pytest.raises(UserError, match="not supported yet"):
        export_gguf(tiny_ds, tmp_path / "ds.gguf")
    assert not list(tmp_path.iterdir())


def test_bad_dtype_and_missing_folder(tiny_qwen, tmp_path):
    with pytest.raises(UserError, match="dtype"):
        export_gguf(tiny_qwen, tmp_path / "x.gguf", dtype="q4_0")
    with pytest.raises(UserError, match="config.json"):
        export_gguf(tmp_path, tmp_path / "x.gguf")


# ---------------------------------------------------------------- llama.cpp (llama-cpp-python)
# These run where the llama_cpp binding is importable and are skipped elsewhere (as in CI).

CPP_TEXTS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.", "I'M here, you're there; it's 2024!",
    "(hello) [world] {x}", "line one\n\nline two\n", "tabs\tand  double  spaces ", "x = 12345 + 678.9",
    "你好，世界！今天天气很好。", "中文和English混合123",
    "<｜begin▁of▁sentence｜><｜User｜>2+2等于几？<｜Assistant｜><think>\n四</think>4<｜end▁of▁sentence｜>",
]
CPP_PROMPTS = ["hello", "What is the capital of France?", "请用中文回答：1+1等于几？"]
CPP_NEW_TOKENS = 16


def _llama_cpp(path: Path, **kwargs):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, n_threads=1,
                           n_threads_batch=1, **kwargs)


def _hf_model_and_tokenizer(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("which", ["qwen_f32", "llama_f16"])
def test_llama_cpp_tokenizes_and_renders_template_like_transformers(which, request):
    folder = request.getfixturevalue("tiny_qwen" if which.startswith("qwen") else "tiny_llama")
    llm = _llama_cpp(request.getfixturevalue(which), vocab_only=True)
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    for text in CPP_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert llm.detokenize(ids, special=True).decode() == text
    assert llm.tokenize(b"hi") == tok.encode("hi")  # neither adds BOS on its own
    template = llm.metadata["tokenizer.chat_template"]
    assert template == (folder / "chat_template.jinja").read_text(encoding="utf-8")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "<think>\nhmm</think>hi"},
                {"role": "user", "content": "你好"}]
    rendered = Jinja2ChatFormatter(template=template, bos_token=tok.bos_token,
                                   eos_token=tok.eos_token)(messages=messages).prompt
    assert rendered == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("which, logit_atol", [("qwen_f32", 0.01), ("llama_f16", 0.03)])
def test_llama_cpp_greedy_generation_matches_transformers(which, logit_atol, request):
    """llama.cpp's logits and greedy tokens for the exported GGUF equal transformers'."""
    folder = request.getfixturevalue("tiny_qwen" if which.startswith("qwen") else "tiny_llama")
    llm = _llama_cpp(request.getfixturevalue(which), logits_all=True)
    model, tok = _hf_model_and_tokenizer(folder)
    for prompt in CPP_PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        hf_new = []  # transformers' greedy continuation
        for _ in range(CPP_NEW_TOKENS):
            hf_new.append(int(_hf_logits(model, ids + hf_new)[-1].argmax()))
        hf_logits = _hf_logits(model, ids + hf_new)
        llm.reset()
        llm.eval(ids + hf_new)
        cpp_logits = np.asarray(llm.scores[:llm.n_tokens])
        np.testing.assert_allclose(cpp_logits, hf_logits, atol=logit_atol, rtol=0)
        # Free-running greedy in llama.cpp (its own sampler, top-k 1): the same tokens up to
        # the first step where transformers' top two are closer than the two engines differ.
        tie = 2 * float(np.abs(cpp_logits - hf_logits).max())
        top2 = np.sort(hf_logits[len(ids) - 1:-1], axis=-1)[:, -2:]
        clear = int(np.argmax(np.append(top2[:, 1] - top2[:, 0] < tie, True)))
        assert clear >= CPP_NEW_TOKENS // 2, "too many near-ties for a meaningful comparison"
        cpp_new = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            cpp_new.append(int(token))
            if len(cpp_new) == CPP_NEW_TOKENS:
                break
        assert cpp_new[:clear] == hf_new[:clear], prompt


def _retrain_tokenizer(folder: Path, dest: Path) -> Path:
    """`folder` with its tokenizer retrained on multi-line text, in the tiny tokenizer's layout.

    The tiny tokenizer learns from single lines, so none of its merges crosses a place where
    one pre-tokenizer splits and another does not (around newlines and punctuation); any
    llama.cpp pre-tokenizer name then gives the same ids. This one's merges do cross them.
    """
    import random
    import shutil

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from r1tune.models.tiny import REASONING, SPECIAL, _corpus_lines

    lines, rnd = list(_corpus_lines()), random.Random(0)
    seps = ["\n", "\n\n", "\n  ", ") (", ".\n", " 123 ", "?!\n\n", ":\n  - "]
    texts = ["".join(rnd.choice(lines) + rnd.choice(seps) for _ in range(4)) for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    rows = _config(folder)["vocab_size"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=rows - len(REASONING), special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING])
    shutil.copytree(folder, dest)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dest / name).unlink()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[0], eos_token=SPECIAL[1],
                            pad_token=SPECIAL[2]).save_pretrained(dest)
    return dest


def test_llama_cpp_splits_text_as_transformers_when_merges_cross_pieces(tiny_llama, tmp_path):
    """With "qwen2" as tokenizer.ggml.pre (before the fix), about half of these got other ids."""
    import random

    from transformers import AutoTokenizer

    folder = _retrain_tokenizer(tiny_llama, tmp_path / "m")
    path = export_gguf(folder, tmp_path / "m.gguf", dtype="f32")
    assert read_gguf_summary(path)["metadata"]["tokenizer.ggml.pre"] == "refact"
    llm = _llama_cpp(path, vocab_only=True)
    tok, rnd = AutoTokenizer.from_pretrained(folder), random.Random(1)
    pieces = ["hello", " world", "\n", "\n\n", "  ", "(", ")", ".", "?!", "'S", " 42", "你好", "：", "\t"]
    texts = CPP_TEXTS + ["".join(rnd.choice(pieces) for _ in range(12)) for _ in range(200)]
    differ = [t for t in texts if llm.tokenize(t.encode(), add_bos=False, special=True)
              != tok.encode(t, add_special_tokens=False)]
    assert not differ, f"{len(differ)}/{len(texts)} differ, e.g. {differ[0]!r}"


def _copy_with(folder: Path, dest: Path, name: str, **changes) -> Path:
    import shutil

    shutil.copytree(folder, dest)
    data = json.loads((dest / name).read_text(encoding="utf-8"))
    data.update(changes)
    (dest / name).write_text(json.dumps(data), encoding="utf-8")
    return dest


def test_modelfile_leaves_bos_to_runtime_when_gguf_adds_it(tiny_qwen, tmp_path):
    folder = _copy_with(tiny_qwen, tmp_path / "m", "tokenizer_config.json", add_bos_token=True)
    gguf_path = export_gguf(folder, tmp_path / "m.gguf", dtype="f32")
    assert read_gguf_summary(gguf_path)["metadata"]["tokenizer.ggml.add_bos_token"] is True
    text = write_modelfile(gguf_path, tmp_path / "Modelfile", folder).read_text(encoding="utf-8")
    assert 'TEMPLATE """{{- if .System }}' in text


def test_pre_tokenizer_name_follows_what_transformers_applies(tiny_qwen, tiny_llama, qwen_f32, llama_f16):
    """The tiny llama tokenizer (single digits, then GPT-2's regex) is llama.cpp's "refact";
    a qwen2 folder loads as Qwen2Tokenizer, which splits with Qwen2's regex whatever
    tokenizer.json says: "qwen2"."""
    from r1tune.export.gguf_export import LLAMA3_REGEX, QWEN2_REGEX, _pre_tokenizer_name

    assert read_gguf_summary(llama_f16)["metadata"]["tokenizer.ggml.pre"] == "refact"
    assert read_gguf_summary(qwen_f32)["metadata"]["tokenizer.ggml.pre"] == "qwen2"
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    for regex, name in ((QWEN2_REGEX, "qwen2"), (LLAMA3_REGEX, "llama-bpe")):  # R1's Qwen / Llama distills
        split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
        assert _pre_tokenizer_name({"type": "Sequence", "pretokenizers": [split, byte_level]}) == name
    assert _pre_tokenizer_name({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    # An unknown transformers-side layout falls back to tokenizer.json's before any guess.
    file_pre = json.loads((tiny_llama / "tokenizer.json").read_text(encoding="utf-8"))["pre_tokenizer"]
    assert _pre_tokenizer_name({"type": "Metaspace"}, file_pre) == "refact"


def test_llama3_rope_scaling_writes_rope_freqs(tiny_llama, tmp_path):
    rope = dict(rope_theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=8192)
    folder = _copy_with(tiny_llama, tmp_path / "m", "config.json", rope_parameters=rope)
    gguf_path = export_gguf(folder, tmp_path / "m.gguf")
    summary = read_gguf_summary(gguf_path)
    assert summary["metadata"]["llama.rope.freq_base"] == pytest.approx(500000.0)
    factors = read_gguf_tensor(gguf_path, "rope_freqs.weight")
    assert factors.shape == (32 // 2,)  # head_dim 32
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)


def test_unsupported_rope_scaling_is_a_user_error(tiny_llama, tmp_path):
    folder = _copy_with(tiny_llama, tmp_path / "m", "config.json",
                        rope_parameters=dict(rope_theta=1e4, rope_type="yarn", factor=4.0))
    with pytest.raises(UserError, match="yarn"):
        export_gguf(folder, tmp_path / "m.gguf")
