"""Tokenized cache: same examples as in memory, hit on rerun (no tokenization), new key on change, workers."""

import json
import time

import pytest

from r1tune.data import cache as cache_module
from r1tune.data import dataset as dataset_module
from r1tune.data.prepare import prepare_data
from r1tune.errors import UserError
from r1tune.models.loading import load_tokenizer
from tests.conftest import make_cfg, write_jsonl


def _records(n=300):
    return [{"instruction": f"What is {i} plus {i % 7}?", "output": f"<think>\n{i}+{i % 7}\n</think>\n\n{i + i % 7}"}
            for i in range(n)] + [{"text": f"doc {i}", "label": "x"} for i in range(3)]


def _examples(seq):
    return [(e.input_ids, e.labels, e.label, e.truncated) for e in seq]


@pytest.fixture()
def setup(tiny_ds, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", _records())
    tok = load_tokenizer(tiny_ds, False)

    def cfg(**keys):
        options = dict(data_cache_dir=str(tmp_path / "cache"), val_size=0.1, cutoff_len=24) | keys
        return make_cfg(tiny_ds, data, tmp_path / "out", **options)
    return cfg, tok, data, tmp_path


def test_cached_equals_in_memory(setup):
    cfg, tok, _, _ = setup
    memory, cached = prepare_data(cfg(data_cache=False), tok), prepare_data(cfg(), tok)
    assert _examples(cached.train) == _examples(memory.train) and _examples(cached.val) == _examples(memory.val)
    assert cached.val_conversations == memory.val_conversations
    assert cached.report.lines() == memory.report.lines() and memory.report.truncated > 0
    two_workers = prepare_data(cfg(preprocessing_num_workers=2, overwrite_cache=True), tok)
    assert _examples(two_workers.train) == _examples(memory.train)


def test_rerun_hits_the_cache_without_tokenizing(setup, monkeypatch):
    cfg, tok, _, _ = setup
    start = time.perf_counter()
    first = prepare_data(cfg(), tok)
    build = time.perf_counter() - start

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized on a cache hit")
    monkeypatch.setattr(cache_module, "encode_chunk", no_tokenizing)
    monkeypatch.setattr(cache_module, "encode_all", no_tokenizing)
    monkeypatch.setattr(dataset_module, "encode_all", no_tokenizing)
    start = time.perf_counter()
    again = prepare_data(cfg(), tok)
    hit = time.perf_counter() - start
    assert _examples(again.train) == _examples(first.train) and hit < build


def test_key_changes_with_data_options_and_tokenizer(setup):
    cfg, tok, data, _ = setup
    base = cache_module.cache_key(cfg(), tok)
    assert cache_module.cache_key(cfg(), tok) == base
    assert cache_module.cache_key(cfg(cutoff_len=32), tok) != base
    assert cache_module.cache_key(cfg(template="deepseek_v3"), tok) != base
    data.write_text(data.read_text() + json.dumps({"instruction": "new", "output": "x"}) + "\n")
    changed_data = cache_module.cache_key(cfg(), tok)
    assert changed_data != base
    tok.add_tokens(["domainword"])
    assert cache_module.cache_key(cfg(), tok) != changed_data


def test_failed_build_leaves_no_entry(setup):
    cfg, tok, data, tmp_path = setup
    data.write_text(data.read_text() + '{"instruction": "broken"}\n')
    with pytest.raises(UserError, match=r"d.jsonl line 304: field 'output' is missing"):
        prepare_data(cfg(), tok)
    assert not any((tmp_path / "cache").iterdir())
    skipped = prepare_data(cfg(on_bad_record="skip"), tok)
    hit = prepare_data(cfg(on_bad_record="skip"), tok)
    assert len(skipped.report.skipped) == len(hit.report.skipped) == 1


def test_damaged_entry_is_rebuilt_and_unwritable_cache_is_one_sentence(setup, tmp_path):
    cfg, tok, _, _ = setup
    first = prepare_data(cfg(), tok)
    entry = next(p for p in (tmp_path / "cache").iterdir())
    (entry / "train.offsets.npy").write_bytes(b"not numpy")
    again = prepare_data(cfg(), tok)
    assert _examples(again.train) == _examples(first.train)
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write the tokenized cache .*data_cache: false"):
        prepare_data(cfg(data_cache_dir=str(blocker / "cache")), tok)


def test_truncated_classification_keeps_its_label_and_pt_needs_no_chat_template(tiny_ds, tmp_path):
    from r1tune.data.templates import apply_template_choice

    long_label = "category " * 30  # truncated inside the label: still trains, must keep its class
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": "w", "label": long_label}, {"text": "w", "label": "short"}])
    tok = load_tokenizer(tiny_ds, False)
    cfg = make_cfg(tiny_ds, data, tmp_path / "out", cutoff_len=24, balance_classes=True,
                   data_cache_dir=str(tmp_path / "c"))
    prepared = prepare_data(cfg, tok)
    assert sorted(e.label for e in prepared.train) == [long_label.strip(), "short"] and prepared.report.truncated == 1
    docs = tmp_path / "docs.txt"
    docs.write_text("plain text\n", encoding="utf-8")
    tok.chat_template = None
    pt = make_cfg(tiny_ds, docs, tmp_path / "out", stage="pt", data_cache_dir=str(tmp_path / "c"))
    apply_template_choice(tok, pt.template, needs_template=False)
    assert prepare_data(pt, tok).report.records == 1
