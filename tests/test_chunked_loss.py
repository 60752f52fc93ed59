"""Chunked cross-entropy: same loss and gradients as the plain loss, on the function and on real models."""

import pytest
import torch

from r1tune.data.encode import IGNORE
from r1tune.errors import UserError
from r1tune.train.chunked_loss import chunked_loss_sum, plain_head
from r1tune.train.losses import causal_lm_loss_sum
from r1tune.train.held_out import choose_loss_path


def _inputs(vocab=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 40, 48, generator=g).requires_grad_()
    weight = (torch.randn(vocab, 48, generator=g) * 0.05).requires_grad_()
    labels = torch.randint(0, vocab, (3, 40), generator=g)
    labels[:, :12] = IGNORE
    labels[1, 30:] = IGNORE
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, labels):
    hidden.grad = weight.grad = None
    n = int((labels[:, 1:] != IGNORE).sum())
    loss = fn(hidden, weight, labels) / n
    loss.backward()
    return loss.item(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 4096])
def test_function_matches_plain_cross_entropy(chunk_rows):
    hidden, weight, labels = _inputs()
    plain = _loss_and_grads(lambda h, w, y: causal_lm_loss_sum(h @ w.T, y), hidden, weight, labels)
    chunked = _loss_and_grads(lambda h, w, y: chunked_loss_sum(h, w, y, chunk_rows), hidden, weight, labels)
    assert abs(plain[0] - chunked[0]) <= 1e-5
    assert (plain[1] - chunked[1]).abs().max() <= 1e-5 and (plain[2] - chunked[2]).abs().max() <= 1e-5


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_matches_torch(smoothing):
    hidden, weight, labels = _inputs()
    plain = _loss_and_grads(lambda h, w, y: causal_lm_loss_sum(h @ w.T, y, smoothing), hidden, weight, labels)
    chunked = _loss_and_grads(lambda h, w, y: chunked_loss_sum(h, w, y, 64, smoothing), hidden, weight, labels)
    unsmoothed = _loss_and_grads(lambda h, w, y: chunked_loss_sum(h, w, y, 64), hidden, weight, labels)
    assert abs(plain[0] - chunked[0]) <= 1e-5 and abs(unsmoothed[0] - chunked[0]) > 1e-4
    assert (plain[1] - chunked[1]).abs().max() <= 1e-5 and (plain[2] - chunked[2]).abs().max() <= 1e-5


def test_frozen_head_and_no_grad():
    hidden, weight, labels = _inputs()
    weight.requires_grad_(False)
    loss = chunked_loss_sum(hidden, weight, labels)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        assert abs(chunked_loss_sum(hidden, weight, labels).item() - loss.item()) < 1e-4


@pytest.mark.parametrize("arch", ["tiny_ds", "tiny_qwen"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_model_loss_and_gradients_match(arch, method, request, tmp_path, parity_file):
    from transformers import AutoModelForCausalLM

    from r1tune.models.methods import attach_method
    from r1tune.train import batching
    from r1tune.data.prepare import prepare_data
    from r1tune.models.loading import load_tokenizer
    from tests.conftest import make_cfg

    path = request.getfixturevalue(arch)
    cfg = make_cfg(path, parity_file, tmp_path / "out", finetuning_type=method, data_cache=False)
    examples = prepare_data(cfg, load_tokenizer(path, False)).train[:6]
    batch = batching.collate(examples, 0, "sdpa")
    torch.manual_seed(0)
    model = attach_method(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), cfg)
    for param in model.parameters():
        if param.requires_grad:  # LoRA B starts at zero: give the adapters a real effect
            param.data.add_(torch.randn_like(param) * 0.01)
    inputs = {**batching.model_inputs(batch), "use_cache": False}
    n = batching.count_targets(batch)

    def run(chunked: bool):
        model.zero_grad()
        if chunked:
            decoder, head = plain_head(model)
            loss = chunked_loss_sum(decoder(**inputs).last_hidden_state, head.weight, batch["labels"]) / n
        else:
            loss = causal_lm_loss_sum(model(**inputs).logits, batch["labels"]) / n
        loss.backward()
        return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = run(False)
    chunked_loss, chunked_grads = run(True)
    assert abs(plain_loss - chunked_loss) <= 1e-5
    assert plain_grads.keys() == chunked_grads.keys() and plain_grads
    assert max((plain_grads[k] - chunked_grads[k]).abs().max().item() for k in plain_grads) <= 1e-5


def test_forced_on_for_an_unsupported_head_is_one_sentence(tiny_qwen):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    assert choose_loss_path(model, None) is not None
    model.config.model_type = "gemma2"  # soft-capped logits: not a plain head
    assert choose_loss_path(model, None) is None
    with pytest.raises(UserError, match="'chunked_loss' is true, but Qwen2ForCausalLM's logits are not a plain"):
        choose_loss_path(model, True)


def test_head_matmuls_see_row_counts_rounded_to_a_multiple():
    """Any number of labelled positions reaches the head's matmuls as a multiple of ROW_MULTIPLE rows
    (oneDNN keeps state per matmul shape), with the same loss and gradients as unpadded."""
    from torch.profiler import ProfilerActivity, profile

    from r1tune.train.chunked_loss import ROW_MULTIPLE, chunked_loss_sum, rows_per_chunk
    from r1tune.train.losses import causal_lm_loss_sum

    assert rows_per_chunk(129_280) == 256 and rows_per_chunk(2_000) % ROW_MULTIPLE == 0
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 50, 32, generator=gen, requires_grad=True)
    weight = torch.randn(300, 32, generator=gen, requires_grad=True)
    labels = torch.randint(0, 300, (2, 50), generator=gen)
    labels[0, :17] = -100  # 81 labelled positions predicted: not a multiple of 64
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss = chunked_loss_sum(hidden, weight, labels, chunk_rows=64)
        loss.backward()
    rows = [shapes[0][0] for e in prof.key_averages(group_by_input_shape=True)
            if e.key in ("aten::mm", "aten::matmul") and (shapes := e.input_shapes) and len(shapes[0]) == 2
            and shapes[1] and shapes[1][-1] in (32, 300) and shapes[0][1] in (32, 300)]
    assert rows and all(r % ROW_MULTIPLE == 0 for r in rows), rows
    got = (loss.item(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    causal_lm_loss_sum(hidden @ weight.T, labels).backward()
    assert abs(got[0] - causal_lm_loss_sum(hidden @ weight.T, labels).item()) <= 1e-3
    assert (got[1] - hidden.grad).abs().max() <= 1e-5 and (got[2] - weight.grad).abs().max() <= 1e-5
