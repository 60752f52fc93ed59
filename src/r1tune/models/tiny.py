"""Small random-init models with a DeepSeek-R1 tokenizer, built offline in seconds.

`build_tiny(out, arch)` trains a byte-level BPE tokenizer on the bundled English and
Chinese text (digits always split one by one, as DeepSeek's tokenizer does), adds
DeepSeek-R1's special tokens and chat template, and saves a seeded random model of
the chosen architecture as safetensors. Same seed, same files.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from r1tune.data import templates as T
from r1tune.fileio import atomic_folder

ARCHES = ("deepseek_v3", "qwen2", "llama")
SPECIAL = [T.BOS, T.EOS, T.PAD, T.USER, T.ASSISTANT]
# Reasoning markers are ordinary added tokens in DeepSeek-R1: kept when decoding.
REASONING = [T.THINK_OPEN, T.THINK_CLOSE]


# transformers loads a qwen2 folder's tokenizer as Qwen2Tokenizer, which appends this token
# when missing; the tiny qwen2 tokenizer carries it so tokenizer and embedding sizes agree.
ARCH_TOKENS = {"qwen2": ["<|endoftext|>"]}


def build_tokenizer(vocab_size: int = 2048, extra_special: list[str] = ()) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_special])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=T.BOS, eos_token=T.EOS, pad_token=T.PAD,
        clean_up_tokenization_spaces=False, model_max_length=4096)
    fast.chat_template = T.DEEPSEEK_R1_TEMPLATE
    return fast


def _corpus_lines():
    folder = resources.files("r1tune.resources")
    for name in ("corpus_en.txt", "corpus_zh.txt"):
        yield from folder.joinpath(name).read_text(encoding="utf-8").splitlines()


# Layer widths for any hidden_size that is a multiple of 64: every nn.Linear's output is a multiple
# of 32 and its input a multiple of 64, which bitsandbytes' CPU 4-bit kernel (AVX-512 BF16 CPUs)
# needs (envinfo.CPU_4BIT_*); on an AMX CPU bench/layer_widths.py also shows narrow widths off the
# 64 grid costing more per column (80: +26 % fp32 / +39 % bf16, 96: +14 % / +23 %, against 128).
HIDDEN_MULTIPLE = 64
# DeepSeek-V3's MLA head dims halved (real: rope 64, nope 128, v 128): a query/key head is 96 wide and
# a value head 64, unequal as in the real model.
ROPE_DIM, NOPE_DIM, V_DIM = 32, 64, 64


def round_up(value: float, multiple: int) -> int:
    return int(-(-value // multiple) * multiple)


def check_hidden_size(hidden_size: int) -> None:
    if hidden_size < HIDDEN_MULTIPLE or hidden_size % HIDDEN_MULTIPLE:
        raise ValueError(f"hidden_size must be a positive multiple of {HIDDEN_MULTIPLE} (got {hidden_size}), "
                         "so that every layer width suits the CPU kernels")


def model_config(arch: str, vocab_size: int, hidden_size: int = 256, num_layers: int = 4, tokenizer=None):
    """A small config of `arch`; sizes scale together from hidden_size (a multiple of 64)."""
    from transformers import DeepseekV3Config, LlamaConfig, Qwen2Config

    check_hidden_size(hidden_size)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id) if tokenizer is not None else {}
    heads = max(2, hidden_size // 64)
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=heads, max_position_embeddings=4096, tie_word_embeddings=False, **ids)
    if arch == "deepseek_v3":
        return DeepseekV3Config(
            **common, intermediate_size=2 * hidden_size, moe_intermediate_size=round_up(hidden_size / 2, HIDDEN_MULTIPLE),
            num_key_value_heads=heads, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1,
            kv_lora_rank=round_up(hidden_size / 4, HIDDEN_MULTIPLE), q_lora_rank=round_up(hidden_size / 2, HIDDEN_MULTIPLE),
            qk_rope_head_dim=ROPE_DIM,
            qk_nope_head_dim=NOPE_DIM, v_head_dim=V_DIM, num_mtp_layers=0)
    kv_heads = max(1, heads // 2)
    inner = round_up(2.75 * hidden_size, HIDDEN_MULTIPLE)
    if arch == "qwen2":
        return Qwen2Config(**common, intermediate_size=inner, num_key_value_heads=kv_heads)
    if arch == "llama":
        return LlamaConfig(**common, intermediate_size=inner, num_key_value_heads=kv_heads)
    raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ARCHES}")


def widen_output_head(model, hidden_size: int) -> None:
    """Re-draw lm_head with std 2/sqrt(hidden).

    With the default std 0.02 and a frozen head (LoRA), the largest logit the model can
    reach is about 0.02 * hidden, so a tiny model could never become confident and its
    loss would stall far above zero. A pretrained head has no such limit; this restores it.
    """
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 2.0 / hidden_size ** 0.5)


def build_tiny(out: str | Path, arch: str = "deepseek_v3", seed: int = 0,
               hidden_size: int = 256, num_layers: int = 4) -> Path:
    """Write tokenizer + random model to `out` (atomically: a temp folder renamed at the end)."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    tokenizer = build_tokenizer(extra_special=ARCH_TOKENS.get(arch, []))
    config = model_config(arch, len(tokenizer), hidden_size, num_layers, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    widen_output_head(model, hidden_size)
    model.generation_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, do_sample=False)
    with atomic_folder(out) as tmp:  # an interrupted build never leaves a half-written model folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
