"""Domain vocabulary: token files, number-safe added tokens, resize + init, training the new rows."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from r1tune.errors import UserError
from r1tune.models.methods import exact_lora_targets, resolve_lora_targets
from r1tune.models.vocab import (add_domain_tokens, is_number, lora_token_training, needs_word_boundary,
                                 read_token_file, resize_and_init)

DOMAIN = ["心肌梗死", "β受体阻滞剂", "EBITDA", "COVID-19", "GB", "mg/dL"]

# Strings in which no domain token stands as a whole word: must tokenize exactly as before.
UNCHANGED = [
    "2019年", "2019年的COVID-190样本", "COVID-190", "COVID-1", "COVID-19a", "x_COVID-19", "COVID-19年",
    "新冠COVID-19疫情", "3.14159", "GB2312", "GBP", "1GB", "10GB内存", "EBITDA2", "EBITDAR", "mg/dLx",
    "12,345.67", "-42", "1e-5", "v2.0.1", "第3章", "4.2亿元", "100%", "2024-05-01", "42", "3.14",
]
# Strings that contain a domain token: the digits must still be the same tokens as before.
WITH_TOKENS = ["COVID-19", "确诊 COVID-19 共2019例", "a COVID-19 case in 2020", "(COVID-19)", "5 GB",
               "EBITDA 12.5%", "血糖7.8 mg/dL", "患者心肌梗死后3天", "β受体阻滞剂25mg"]


@pytest.fixture()
def fresh_tok(tiny_ds):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_ds)


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- token files

def test_read_token_file(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text("\ufeff# domain terms\n心肌梗死\n\n  EBITDA  \nC#\n   # indented comment\nCOVID-19\n",
                    encoding="utf-8")
    assert read_token_file(str(path)) == ["心肌梗死", "EBITDA", "C#", "COVID-19"]


def test_read_token_file_nfc(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text("Cafe\u0301\n", encoding="utf-8")
    assert read_token_file(str(path)) == ["Caf\u00e9"]


@pytest.mark.parametrize("content, expected", [
    (b"ok\nbad token\n", r"run\.yaml: token file '.*tokens\.txt' line 2: 'bad token' contains whitespace"),
    (b"ok\nfine\nbad\xff\n", r"run\.yaml: token file '.*tokens\.txt' line 3 is not valid UTF-8"),
    (b"ctl\x07x\n", r"line 1: 'ctl\\x07x' contains a control or invisible character \(U\+0007\)"),
    (b"zero\xe2\x80\x8bwidth\n", r"line 1: .* contains a control or invisible character \(U\+200B\)"),
    (b"a\tb\n", r"line 1: 'a\\tb' contains whitespace"),
    (b"# only comments\n\n", r"token file '.*tokens\.txt' has no tokens"),
])
def test_read_token_file_errors(tmp_path, content, expected):
    path = tmp_path / "tokens.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=expected):
        read_token_file(str(path), source="run.yaml")


def test_read_token_file_missing(tmp_path):
    with pytest.raises(UserError, match=r"run\.yaml: token file '.*nope\.txt' does not exist"):
        read_token_file(str(tmp_path / "nope.txt"), source="run.yaml")
    with pytest.raises(UserError, match=r"is a folder, not a file"):
        read_token_file(str(tmp_path), source="run.yaml")


# ---------------------------------------------------------------- adding tokens

def test_number_and_boundary_rules():
    for token in ("42", "3.14", "1,000", "-5", "４２", "50%", "二十"):
        assert is_number(token), token
    for token in ("COVID-19", "GB", "v2", "℃", "心肌梗死", "-"):
        assert not is_number(token), token
    assert needs_word_boundary("COVID-19") and needs_word_boundary("GB") and needs_word_boundary("°C")
    assert not needs_word_boundary("心肌梗死") and not needs_word_boundary("β受体阻滞剂")


def test_add_tokens_skips_and_notes(fresh_tok):
    before = len(fresh_tok)
    extra = ["42", "3.14", "<think>", "is", "心肌梗死", "a b", "", "°C"]
    ids, notes = add_domain_tokens(fresh_tok, DOMAIN + extra)
    assert ids == list(range(before, before + len(DOMAIN) + 1))
    assert len(fresh_tok) == before + len(DOMAIN) + 1
    text = "\n".join(notes)
    for token in ("'42'", "'3.14'", "'<think>'", "'is'", "'a b'"):
        assert token in text
    assert "listed more than once" in text and "empty token" in text
    assert "'°C' starts or ends with an ASCII letter or digit" in text
    added = fresh_tok.added_tokens_decoder
    assert added[ids[DOMAIN.index("COVID-19")]].single_word
    assert not added[ids[DOMAIN.index("心肌梗死")]].single_word
    assert not any(added[i].special for i in ids)
    again = add_domain_tokens(fresh_tok, DOMAIN)
    assert again == ([], [f"skipped {t!r}: it is already a single token" for t in DOMAIN])


def test_numbers_tokenize_as_before(tiny_ds, fresh_tok):
    from transformers import AutoTokenizer

    old = AutoTokenizer.from_pretrained(tiny_ds)
    ids, _ = add_domain_tokens(fresh_tok, DOMAIN + ["42", "3.14", "°C"])
    new = set(ids)
    for text in UNCHANGED:
        assert _ids(fresh_tok, text) == _ids(old, text), text
    checked = 0
    for text in WITH_TOKENS:
        enc = fresh_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        got = enc["input_ids"]
        assert new & set(got), text                                   # a domain token is used
        assert fresh_tok.decode(got) == text
        # outside the domain tokens, every digit is the same token at the same place as before
        inside = {k for i, (a, b) in zip(got, enc["offset_mapping"]) if i in new for k in range(a, b)}
        before = old(text, add_special_tokens=False, return_offsets_mapping=True)
        expect = [(i, a) for i, (a, b) in zip(before["input_ids"], before["offset_mapping"])
                  if text[a:b].isdigit() and a not in inside]
        actual = [(i, a) for i, (a, b) in zip(got, enc["offset_mapping"]) if text[a:b].isdigit()]
        assert actual == expect, text
        checked += len(expect)
    assert checked >= 15


def test_new_tokens_encode_as_one_id_and_decode(fresh_tok):
    ids, _ = add_domain_tokens(fresh_tok, DOMAIN)
    for token, token_id in zip(DOMAIN, ids):
        assert _ids(fresh_tok, token) == [token_id]
        assert fresh_tok.decode([token_id]) == token
    text = "患者心肌梗死后，EBITDA 下降；COVID-19 检测 5 GB 数据。"
    encoded = _ids(fresh_tok, text)
    assert {ids[0], ids[2], ids[3], ids[4]} <= set(encoded)
    assert fresh_tok.decode(encoded) == text
    assert "心肌梗死" in fresh_tok.convert_ids_to_tokens(_ids(fresh_tok, "急性心肌梗死的治疗"))


# ---------------------------------------------------------------- resize and init

def test_resize_initialises_rows_from_pieces(tiny_qwen):
    model, tok = _load(tiny_qwen)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    pieces = {t: _ids(tok, t) for t in DOMAIN}
    rows = old_in.shape[0]
    ids, _ = add_domain_tokens(tok, DOMAIN)
    resize_and_init(model, tok, ids)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == len(tok) == model.config.vocab_size
    assert emb.data_ptr() != head.data_ptr()
    assert torch.equal(emb[:rows], old_in) and torch.equal(head[:rows], old_out)
    for token, token_id in zip(DOMAIN, ids):
        assert len(pieces[token]) > 1
        torch.testing.assert_close(emb[token_id], old_in[pieces[token]].mean(0))
        torch.testing.assert_close(head[token_id], old_out[pieces[token]].mean(0))
    # the tiny qwen tokenizer has one token more than the model has rows: that row gets the mean
    for gap in set(range(rows, len(tok))) - set(ids):
        torch.testing.assert_close(emb[gap], old_in.mean(0))


def test_resize_never_shrinks_padded_embeddings(tiny_ds):
    model, tok = _load(tiny_ds)
    model.resize_token_embeddings(len(tok) + 16, mean_resizing=False)   # like DeepSeek's padded vocab
    padded = model.get_input_embeddings().weight.shape[0]
    pieces = _ids(tok, "EBITDA")
    ids, _ = add_domain_tokens(tok, ["心肌梗死", "EBITDA"])
    assert max(ids) < padded
    resize_and_init(model, tok, ids)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == model.get_output_embeddings().weight.shape[0] == padded
    torch.testing.assert_close(emb[ids[1]], emb[pieces].mean(0))


def test_deepseek_resize_and_forward(tiny_ds):
    model, tok = _load(tiny_ds)
    ids, _ = add_domain_tokens(tok, DOMAIN)
    resize_and_init(model, tok, ids)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    batch = tok(["患者心肌梗死后 EBITDA 下降"], return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape[-1] == len(tok) and torch.isfinite(out.loss)


def test_full_finetune_step_updates_new_rows(tiny_qwen):
    model, tok = _load(tiny_qwen)
    ids, _ = add_domain_tokens(tok, DOMAIN)
    resize_and_init(model, tok, ids)
    for p in model.parameters():
        p.requires_grad = False
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    emb.requires_grad = head.requires_grad = True
    before_in, before_out = emb.detach().clone(), head.detach().clone()
    batch = tok(["患者心肌梗死后 EBITDA 和 COVID-19 检测"], return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    torch.optim.SGD([emb, head], lr=1.0).step()
    used = [i for i in ids if i in batch["input_ids"][0].tolist()]   # last input row gets no gradient
    assert len(used) == 3
    assert (emb[used] != before_in[used]).any(dim=1).all()
    assert (head[used] != before_out[used]).any(dim=1).all()


# ---------------------------------------------------------------- LoRA

def test_lora_token_training_kwargs(tiny_qwen):
    assert lora_token_training([]) == {}
    assert lora_token_training([7, 5, 7]) == {"trainable_token_indices": {"embed_tokens": [5, 7], "lm_head": [5, 7]}}
    model, _ = _load(tiny_qwen)
    assert lora_token_training([9], model) == {
        "trainable_token_indices": {"model.embed_tokens": [9], "lm_head": [9]}}


def _peft_model(model, lora_target, extra):
    """What r1tune's attach_lora does, plus the trainable-token kwargs."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_lora_targets(model, lora_target, include_experts=False)
    pattern = "|".join(re.escape(n) for n in targets.modules)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=pattern,
                        task_type="CAUSAL_LM", **extra)
    with exact_lora_targets():
        return get_peft_model(model, config)


def _effective(peft_model):
    """The embedding and head matrices the forward pass uses (new rows swapped in)."""
    inner = peft_model.get_base_model()
    emb, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    return (emb.token_adapter.get_merged_weights(["default"]).detach().clone(),
            head.token_adapter.get_merged_weights(["default"]).detach().clone())


@pytest.mark.parametrize("fixture", ["tiny_qwen", "tiny_ds"])
def test_lora_step_trains_only_new_rows(request, fixture):
    model, tok = _load(request.getfixturevalue(fixture))
    ids, _ = add_domain_tokens(tok, DOMAIN)
    resize_and_init(model, tok, ids)
    for p in model.parameters():
        p.requires_grad = False
    peft_model = _peft_model(model, "attention", lora_token_training(ids, model))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("trainable_tokens_delta" in n and "embed_tokens" in n for n in trainable)
    assert any("trainable_tokens_delta" in n and "lm_head" in n for n in trainable)
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)

    emb0, head0 = _effective(peft_model)
    batch = tok(["患者心肌梗死后 EBITDA 和 COVID-19 的 5 GB 数据"], return_tensors="pt")
    in_batch = [i for i in ids if i in batch["input_ids"][0].tolist()]
    assert len(in_batch) == 4
    optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model(**batch, labels=batch["input_ids"]).loss.backward()
    optim.step()
    emb1, head1 = _effective(peft_model)
    old = torch.ones(emb0.shape[0], dtype=torch.bool)
    old[ids] = False
    assert torch.equal(emb1[old], emb0[old]) and torch.equal(head1[old], head0[old])
    assert (emb1[in_batch] != emb0[in_batch]).any(dim=1).all()
    assert (head1[ids] != head0[ids]).any(dim=1).all()        # every new output row gets a gradient


def test_lora_adapter_save_and_reload(tiny_qwen, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model, tok = _load(tiny_qwen)
    ids, _ = add_domain_tokens(tok, DOMAIN)
    resize_and_init(model, tok, ids)
    for p in model.parameters():
        p.requires_grad = False
    peft_model = _peft_model(model, "all", lora_token_training(ids, model))
    batch = tok(["患者心肌梗死后 EBITDA 和 COVID-19"], return_tensors="pt")
    optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        peft_model(**batch, labels=batch["input_ids"]).loss.backward()
        optim.step()
        optim.zero_grad()
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    tok.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    extra = {k: tuple(v.shape) for k, v in saved.items() if "lora_" not in k}
    assert extra == {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": (len(ids), 64),
                     "base_model.model.lm_head.token_adapter.trainable_tokens_delta": (len(ids), 64)}

    # rebuild the base the same way, with the new rows zeroed: the adapter must restore them
    base, base_tok = _load(tiny_qwen)
    ids2, _ = add_domain_tokens(base_tok, DOMAIN)
    assert ids2 == ids
    resize_and_init(base, base_tok, ids2)
    with torch.no_grad():
        base.get_input_embeddings().weight[ids] = 0
        base.get_output_embeddings().weight[ids] = 0
    with exact_lora_targets(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    peft_model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, peft_model(**batch).logits, rtol=0, atol=1e-6)
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(merged.get_input_embeddings().weight[ids], _effective(peft_model)[0][ids])


def test_domain_tokens_end_to_end_lora_train_save_and_chat(tiny_qwen, tmp_path):
    """add_tokens in a run: data tokenized with the new token, its rows trained, adapter reloads for chat."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from r1tune.models.run_loading import load_run
    from r1tune.train.stages.sft import run_sft
    from tests.conftest import make_cfg, write_jsonl

    records = [{"instruction": f"What is 心肌梗死 case {i}?", "output": f"心肌梗死 is serious ({i})."} for i in range(16)]
    data = write_jsonl(tmp_path / "med.jsonl", records)
    out = tmp_path / "out"
    run_sft(make_cfg(tiny_qwen, data, out, add_tokens="心肌梗死, 42", max_steps=4, learning_rate=1e-2))
    model, tokenizer = load_run(str(out))
    new_id = tokenizer.convert_tokens_to_ids("心肌梗死")
    assert tokenizer("急性心肌梗死", add_special_tokens=False)["input_ids"][-1] == new_id
    assert "42" not in tokenizer.get_added_vocab()  # numbers are never added
    saved = load_file(out / "adapter_model.safetensors")
    assert any("trainable_tokens" in k for k in saved) and all(t.numel() < 10**5 for t in saved.values())
    rows = model.get_input_embeddings()
    ids = torch.tensor([[new_id]])
    from transformers import AutoTokenizer

    base, base_tok = AutoModelForCausalLM.from_pretrained(tiny_qwen), AutoTokenizer.from_pretrained(tiny_qwen)
    resize_and_init(base, base_tok, add_domain_tokens(base_tok, ["心肌梗死"])[0])
    initial = base.get_input_embeddings()(ids)[0, 0]
    assert (rows(ids)[0, 0] - initial).abs().max() > 1e-3  # the trained row, not its initial value
    old = torch.tensor([[5]])
    assert torch.equal(rows(old), base.get_input_embeddings()(old))  # old rows untouched
