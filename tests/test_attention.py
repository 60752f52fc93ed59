"""r1tune's CPU attention: MLA (value heads narrower than q/k) runs through torch's fused CPU kernel, and short
rows in training are written out, both with unchanged numbers."""

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from r1tune.models.attention import NAME, SHORT_ROWS
from r1tune.models.loading import load_model

FUSED, MATH = "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"


def _batch(model, width: int = SHORT_ROWS + 32):
    ids = torch.randint(5, model.config.vocab_size, (2, width), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, width - 36:] = 0  # right padding: SDPA gets an explicit mask
    return ids, mask


def _forward_backward(model, ids, mask):
    model.zero_grad()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads, {e.key for e in prof.key_averages()}


def test_mla_runs_fused_with_the_same_logits_and_gradients(tiny_ds):
    model = load_model(str(tiny_ds))
    assert model.config._attn_implementation == NAME
    ids, mask = _batch(model)
    logits, grads, ops = _forward_backward(model, ids, mask)
    assert FUSED in ops and MATH not in ops

    model.set_attn_implementation("sdpa")  # transformers' own path: the math kernel for MLA
    ref_logits, ref_grads, ref_ops = _forward_backward(model, ids, mask)
    assert MATH in ref_ops
    keep = mask.bool()
    assert (logits - ref_logits)[keep].abs().max() <= 1e-4
    assert grads.keys() == ref_grads.keys()
    assert max((grads[k] - ref_grads[k]).abs().max().item() for k in grads) <= 1e-5


@pytest.mark.parametrize("padded", [True, False])
def test_short_training_rows_are_written_out_with_the_same_logits_and_gradients(tiny_qwen, padded):
    model = load_model(str(tiny_qwen))
    assert model.config._attn_implementation == NAME
    ids, mask = _batch(model, width=96)
    if not padded:
        mask = torch.ones_like(ids)  # no padding: transformers passes no mask (plain causal)
    logits, grads, ops = _forward_backward(model, ids, mask)
    assert FUSED not in ops and MATH not in ops

    model.set_attn_implementation("sdpa")
    ref_logits, ref_grads, ref_ops = _forward_backward(model, ids, mask)
    assert FUSED in ref_ops
    keep = mask.bool()
    assert (logits - ref_logits)[keep].abs().max() <= 1e-4
    assert max((grads[k] - ref_grads[k]).abs().max().item() for k in grads) <= 1e-5


def test_long_rows_and_inference_keep_the_fused_kernel(tiny_qwen):
    model = load_model(str(tiny_qwen))
    _, _, ops = _forward_backward(model, *_batch(model))
    assert FUSED in ops
    ids, mask = _batch(model, width=32)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, attention_mask=mask)
    assert FUSED in {e.key for e in prof.key_averages()}


def test_eager_request_is_left_alone(tiny_ds):
    assert load_model(str(tiny_ds), attn_implementation="eager").config._attn_implementation == "eager"


def test_saved_config_names_no_r1tune_attention(tiny_ds, tmp_path):
    load_model(str(tiny_ds)).save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
    assert "_attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
