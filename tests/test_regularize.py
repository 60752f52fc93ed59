"""Embedding / attention / FFN dropout and NEFTune: active while training only, of the asked size."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from r1tune.train.regularize import apply_regularisation, mlp_blocks
from tests.conftest import make_cfg


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def cfg_with(tmp_path, model_dir, **keys):
    return make_cfg(model_dir, tmp_path / "d.jsonl", tmp_path / "o", **keys)


def test_every_piece_is_off_in_eval_mode(tiny_ds, tmp_path):
    model, plain = load(tiny_ds), load(tiny_ds)
    done = apply_regularisation(model, cfg_with(tmp_path, tiny_ds, embedding_dropout=0.5, attention_dropout=0.5,
                                                ffn_dropout=0.5, neftune_noise_alpha=50.0))
    assert len(done) == 4
    x = torch.randint(5, 500, (2, 12))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, plain.eval()(input_ids=x).logits)
        model.train()
        assert not torch.allclose(model(input_ids=x).logits, plain(input_ids=x).logits, atol=1e-3)


def test_ffn_dropout_zeroes_about_p_of_each_mlp_output(tiny_qwen, tmp_path):
    model = load(tiny_qwen)
    apply_regularisation(model, cfg_with(tmp_path, tiny_qwen, ffn_dropout=0.3))
    outputs = []
    blocks = mlp_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    blocks[0].register_forward_hook(lambda m, a, out: outputs.append(out))  # runs after the dropout hook
    model.train()
    model(input_ids=torch.randint(5, 500, (4, 64)))
    zeros = (outputs[0] == 0).float().mean().item()
    assert 0.25 < zeros < 0.35


def test_neftune_noise_has_the_papers_scale(tiny_qwen, tmp_path):
    model = load(tiny_qwen)
    embeddings = model.get_input_embeddings()
    ids = torch.randint(5, 500, (2, 16))
    clean = embeddings(ids)
    apply_regularisation(model, cfg_with(tmp_path, tiny_qwen, neftune_noise_alpha=5.0))
    model.train()
    noise = embeddings(ids) - clean
    bound = 5.0 / (16 * model.config.hidden_size) ** 0.5
    assert noise.abs().max() <= bound + 1e-6 and noise.abs().max() > 0.8 * bound
    model.eval()
    assert torch.equal(embeddings(ids), clean)


def test_attention_dropout_reaches_every_layer(tiny_ds, tmp_path):
    model = load(tiny_ds)
    apply_regularisation(model, cfg_with(tmp_path, tiny_ds, attention_dropout=0.2))
    rates = [m.attention_dropout for n, m in model.named_modules() if n.endswith("self_attn")]
    assert rates == [0.2] * model.config.num_hidden_layers and model.config.attention_dropout == 0.2
