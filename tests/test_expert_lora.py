"""LoRA on fused MoE experts runs in low rank with PEFT's numbers, layout and fallbacks."""

import torch

from r1tune.models.expert_lora import expert_wrapper_chains, use_lowrank_experts
from r1tune.models.loading import load_model
from r1tune.models.methods import attach_lora, load_lora, resolve_lora_targets


def _lora_model(tiny_ds):
    model = load_model(str(tiny_ds))
    for param in model.parameters():
        param.requires_grad = False
    model = attach_lora(model, 8, 16, 0.0, resolve_lora_targets(model, "all", include_experts=True))
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; give the adapters something to say
            param.data.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


def _use_peft_path(model):
    for chain in expert_wrapper_chains(model):
        chain[0].__dict__.pop("forward", None)


def _run(model, ids):
    model.zero_grad()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage()) or t, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved, but no new memory
    kept = sum(s.nbytes() for s in {s.data_ptr(): s for s in saved if s.data_ptr() not in weights}.values())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads, kept


def test_lowrank_experts_match_peft_and_keep_less_for_backward(tiny_ds):
    model = _lora_model(tiny_ds)
    chains = expert_wrapper_chains(model)
    assert chains and all("forward" in c[0].__dict__ for c in chains)  # installed by attach_lora
    ids = torch.randint(5, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    logits, grads, kept = _run(model, ids)
    _use_peft_path(model)
    ref_logits, ref_grads, ref_kept = _run(model, ids)
    assert (logits - ref_logits).abs().max() <= 1e-4
    expert_grads = [k for k in ref_grads if ".experts." in k]
    assert expert_grads and grads.keys() == ref_grads.keys()
    assert max((grads[k] - ref_grads[k]).abs().max().item() for k in grads) <= 1e-5
    # PEFT keeps a full-size W + s*B*A per expert stack for backward; the low-rank path keeps rows x rank
    # tensors and a copy of B instead (a third of the stacks' size on this tiny model, ~1 % at real sizes)
    full_stacks = sum(c[-1].base_layer.gate_up_proj.nbytes + c[-1].base_layer.down_proj.nbytes for c in chains)
    assert ref_kept - kept >= 0.5 * full_stacks


def test_disabled_merged_and_reloaded_adapters(tiny_ds, tmp_path):
    model = _lora_model(tiny_ds)
    ids = torch.randint(5, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():  # falls back to PEFT, which skips the adapters
            base = model(input_ids=ids).logits
        model.merge_adapter()  # merged weights: PEFT's forward again, same numbers
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
    plain = load_model(str(tiny_ds))
    with torch.no_grad():
        assert (base - plain(input_ids=ids).logits).abs().max() <= 1e-5
    assert (tuned - base).abs().max() > 1e-3 and (tuned - merged).abs().max() <= 1e-4
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_lora(load_model(str(tiny_ds)), str(tmp_path / "adapter"))
    assert all("forward" in c[0].__dict__ for c in expert_wrapper_chains(reloaded))
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - tuned).abs().max() <= 1e-5


def test_dense_models_have_no_expert_wrappers(tiny_qwen):
    model = load_model(str(tiny_qwen))
    model = attach_lora(model, 8, 16, 0.0, resolve_lora_targets(model, "all", include_experts=True))
    assert expert_wrapper_chains(model) == [] and use_lowrank_experts(model) == 0
