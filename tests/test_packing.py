"""Contamination-free packing (equivalence with unpacked batches) and sliding-window chunking."""

import random

import pytest
import torch

from r1tune.data.chunking import sliding_windows
from r1tune.data.encode import IGNORE, Example
from r1tune.data.packing import pack_examples
from r1tune.train.batching import collate, count_targets, model_inputs
from r1tune.train.losses import causal_lm_loss_sum


def _examples(n=7, seed=0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        size = rng.randint(5, 30)
        ids = [rng.randint(10, 1000) for _ in range(size)]
        out.append(Example(ids, [IGNORE] * (size // 2) + ids[size // 2:]))
    return out


def _loss_and_grads(model, batch: list[Example], attn: str, packed_mask: bool = True):
    model.zero_grad()
    tensors = collate(batch, 0, attn)
    if not packed_mask:  # negative control: packed rows with a plain padding mask
        tensors["attention_mask"] = (tensors["input_ids"] != 0).long()
        tensors.pop("position_ids", None)
    tensors = {k: v for k, v in tensors.items() if v is not None}
    loss = causal_lm_loss_sum(model(**model_inputs(tensors)).logits, tensors["labels"]) / count_targets(tensors)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["tiny_qwen", "tiny_ds"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_match_unpacked(arch, attn, request):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(arch), attn_implementation=attn,
                                                 dtype=torch.float32)
    examples = _examples()
    packed = pack_examples(examples, capacity=64)
    assert len(packed) < len(examples) and sum(len(p.segments) for p in packed) == len(examples)
    loss, grads = _loss_and_grads(model, examples, attn)
    packed_loss, packed_grads = _loss_and_grads(model, packed, attn)
    assert abs(loss - packed_loss) <= 1e-5
    assert max((grads[k] - packed_grads[k]).abs().max().item() for k in grads) <= 1e-5
    leaked_loss, _ = _loss_and_grads(model, packed, attn, packed_mask=False)
    assert abs(loss - leaked_loss) > 1e-3  # the test can fail: without the block mask samples see each other


def test_pack_fills_rows_first_fit_and_keeps_every_sample():
    examples = [Example([1] * n, [1] * n) for n in (60, 40, 30, 20, 10, 5)]
    rows = pack_examples(examples, capacity=64)
    assert [r.segments for r in rows] == [(60,), (40, 20), (30, 10, 5)]
    assert all(len(r.input_ids) <= 64 for r in rows)
    assert rows[1].labels[0] == IGNORE and rows[1].labels[40] == IGNORE  # no target across a sample boundary


def test_collate_positions_restart_and_mask_is_block_diagonal():
    row = Example([5, 6, 7, 8, 9], [5, 6, 7, 8, 9], segments=(3, 2))
    batch = collate([row, Example([1, 2], [1, 2], segments=(2,))], pad_id=0, attn="sdpa", multiple=1)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    mask = batch["attention_mask"][0, 0]
    assert mask[4].tolist() == [False, False, False, True, True]  # the second sample sees only itself
    assert mask[2].tolist() == [True, True, True, False, False]
    assert batch["attention_mask"][1, 0, 3].tolist() == [False, False, True, True, False]  # padding sees only padding
    assert collate([row], 0, "flash_attention_2")["attention_mask"] is None


def test_sliding_windows_train_every_token_once():
    ids = list(range(100, 130))
    example = Example(ids, [IGNORE] * 4 + ids[4:])
    windows = sliding_windows(example, window=12, overlap=4)
    starts = [0, 8, 16, 24]
    assert [w.input_ids[0] for w in windows] == [ids[s] for s in starts]
    assert all(len(w.input_ids) <= 12 for w in windows) and windows[-1].input_ids[-1] == ids[-1]
    for start, window in zip(starts, windows):
        assert window.input_ids[:4] == ids[start:start + 4]  # overlap repeats the previous tail as context
    trained = [t for w in windows for t in w.labels if t != IGNORE]
    assert sorted(trained) == ids[4:] and len(trained) == len(set(trained))
    assert sliding_windows(example, window=40, overlap=4) == [example]


def test_pt_stage_chunks_and_packs_documents(tiny_qwen, tmp_path):
    from r1tune.data.prepare import prepare_data
    from r1tune.models.loading import load_tokenizer
    from tests.conftest import make_cfg

    doc = " ".join(f"word{i}" for i in range(300))
    path = tmp_path / "docs.txt"
    path.write_text(f"{doc}\nshort one\nshort two\n", encoding="utf-8")
    tok = load_tokenizer(tiny_qwen, False)
    cfg = make_cfg(tiny_qwen, path, tmp_path / "out", stage="pt", cutoff_len=64, chunk_overlap=8, packing=True)
    data = prepare_data(cfg, tok)
    assert data.report.chunked == 1 and data.report.truncated == 0
    assert all(len(row.input_ids) <= 64 for row in data.train)
    every_token = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in (doc, "short one", "short two"))
    assert sum(row.num_targets for row in data.train) == every_token  # each text token and EOS trained once


def test_packed_sft_run_with_eval_dataset(tiny_ds, parity_file, tmp_path):
    from r1tune.train.logs import read_log
    from r1tune.train.stages.sft import run_sft
    from tests.conftest import make_cfg

    cfg = make_cfg(tiny_ds, parity_file, tmp_path / "out", packing=True, cutoff_len=256, max_steps=6,
                   per_device_train_batch_size=2, learning_rate=1e-2, eval_dataset=str(parity_file))
    run_sft(cfg)
    rows = read_log(tmp_path / "out")
    train = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(train) == 6 and train[-1] < train[0]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [6]


def test_collate_rounds_width_and_masks_the_extra_padding():
    batch = collate([Example([5] * 70, [5] * 70), Example([1, 2], [1, 2])], pad_id=0)
    assert batch["input_ids"].shape == (2, 80)  # short rows: a multiple of 16
    assert collate([Example([5] * 300, [5] * 300)], pad_id=0)["input_ids"].shape == (1, 320)  # long: of 64
    assert int(batch["attention_mask"].sum()) == 72 == int(batch["num_tokens"])
    assert int((batch["labels"] != -100).sum()) == 72
