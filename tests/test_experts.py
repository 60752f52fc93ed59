"""Expert-selective tuning: routing counts, expert selection, and per-expert gradient masking."""

import json
import math

import pytest
import torch
import transformers

from r1tune.errors import UserError
from r1tune.models.experts import (expert_load_table, moe_layers, parse_expert_ids, read_domain_map,
                                   restrict_expert_training, routing_counts, top_k_experts)
from r1tune.models.methods import attach_lora, resolve_lora_targets


def _load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _batches(model, n=2, seed=0):
    """Batches with right and left padding: pad ids at pad positions, mask 0 there."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(5, model.config.vocab_size, (2, 16), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 11:] = 0 if i % 2 == 0 else 1
        mask[1, :5 + i] = 0
        ids[mask == 0] = model.config.pad_token_id
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def _reference_counts(model, batches):
    """Capture each MoE layer's input, then route it with the router's own forward."""
    layers = moe_layers(model)
    inputs = {layer: [] for layer in layers}
    handles = [mlp.register_forward_pre_hook(lambda m, args, layer=layer: inputs[layer].append(args[0]))
               for layer, mlp in layers.items()]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in handles:
        h.remove()
    counts = torch.zeros(len(layers), 8, dtype=torch.int64)
    for row, (layer, mlp) in enumerate(layers.items()):
        for hidden, batch in zip(inputs[layer], batches):
            with torch.no_grad():
                index = mlp.gate(hidden)[2]
            index = index[batch["attention_mask"].reshape(-1).bool()]
            counts[row] += torch.bincount(index.reshape(-1), minlength=8)
    return counts


def test_moe_layers_and_dense_model(tiny_ds, tiny_qwen):
    assert list(moe_layers(_load(tiny_ds))) == [1]
    dense = _load(tiny_qwen)
    assert moe_layers(dense) == {}
    assert routing_counts(dense, _batches(dense, 1)).shape == (0, 0)
    with pytest.raises(UserError, match="'expert_ids'.*no MoE layers"):
        parse_expert_ids("0,1", moe_layers(dense))


def test_routing_counts_exclude_padding_and_match_router(tiny_ds):
    model = _load(tiny_ds)
    model.train()
    batches = _batches(model)
    seen = []
    counts = routing_counts(model, batches, progress=seen.append)
    non_pad = sum(int(b["attention_mask"].sum()) for b in batches)
    assert counts.shape == (1, 8) and counts.dtype == torch.int64
    assert counts.sum().item() == non_pad * model.config.num_experts_per_tok
    assert non_pad < sum(b["input_ids"].numel() for b in batches)  # there was padding to leave out
    assert torch.equal(counts, _reference_counts(model, batches))
    assert seen == [1, 2] and model.training and all(m.training for m in model.modules())
    experts = model.model.layers[1].mlp.experts
    assert not experts._forward_pre_hooks


def test_routing_counts_remove_hooks_on_error(tiny_ds):
    model = _load(tiny_ds).eval()

    def broken():
        yield _batches(model, 1)[0]
        raise RuntimeError("data error")

    with pytest.raises(RuntimeError, match="data error"):
        routing_counts(model, broken())
    assert not model.model.layers[1].mlp.experts._forward_pre_hooks and not model.training


def test_top_k_experts_picks_busiest_with_ties_to_lower_id():
    counts = torch.tensor([[5, 9, 0, 9, 1], [0, 0, 0, 0, 0]])
    assert top_k_experts(counts, [1, 3], 2) == {1: [1, 3], 3: [0, 1]}
    assert top_k_experts(counts, [1, 3], 3)[1] == [1, 3, 0]


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(model, no_decay: set[str], batches, steps=3):
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if n not in no_decay], "weight_decay": 0.1},
              {"params": [p for n, p in trainable if n in no_decay], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def _selection(model, batches):
    """Two busy experts selected, leaving unselected experts that receive tokens (so would train)."""
    counts = routing_counts(model, batches)
    chosen = top_k_experts(counts, [1], 2)
    unselected = [e for e in range(8) if e not in chosen[1]]
    assert sum(counts[0, e].item() > 0 for e in unselected) >= 3
    return chosen, unselected


@pytest.mark.parametrize("train_router", [False, True])
def test_full_weight_selective_training(tiny_ds, train_router):
    model = _load(tiny_ds)
    batches = _batches(model)
    chosen, unselected = _selection(model, batches)
    masked = restrict_expert_training(model, chosen, train_router=train_router)
    prefix = "model.layers.1.mlp.experts."
    assert masked == {prefix + "gate_up_proj", prefix + "down_proj"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == masked | ({"model.layers.1.mlp.gate.weight"} if train_router else set())
    before = _snapshot(model)
    opt = _train(model, masked, batches)
    after = _snapshot(model)
    for name in masked:
        for e in unselected:
            assert torch.equal(after[name][e], before[name][e]), (name, e)
        for e in chosen[1]:
            assert not torch.equal(after[name][e], before[name][e]), (name, e)
    router = "model.layers.1.mlp.gate.weight"
    assert torch.equal(after[router], before[router]) != train_router
    frozen = [n for n in before if ".self_attn." in n or "layers.0.mlp." in n or "shared_experts" in n]
    assert frozen and all(torch.equal(after[n], before[n]) for n in frozen)
    # Why the masked names must skip decay: one decayed step moves the unselected experts.
    for group in opt.param_groups:
        group["weight_decay"] = 0.1
    model(**batches[0]).loss.backward()
    opt.step()
    name = prefix + "gate_up_proj"
    assert not torch.equal(model.get_parameter(name)[unselected[0]], before[name][unselected[0]])


def _expert_deltas(model):
    """{parameter name: effective per-expert delta (E, out, in)} for every LoRA-wrapped fused expert tensor."""
    from peft.tuners.lora.layer import ParamWrapper

    return {f"{n}.{m.parameter_name}": m.get_delta_weight("default").detach().clone()
            for n, m in model.named_modules() if isinstance(m, ParamWrapper)}


@pytest.mark.parametrize("start", ["fresh", "loaded"])
def test_lora_selective_training_keeps_unselected_delta(tiny_ds, start):
    model = _load(tiny_ds)
    batches = _batches(model)
    plain_counts = routing_counts(model, batches)
    chosen, unselected = _selection(model, batches)
    for param in model.parameters():
        param.requires_grad = False
    model = attach_lora(model, 4, 8, 0.0, resolve_lora_targets(model, "all", include_experts=True))
    assert torch.equal(routing_counts(model, batches), plain_counts)  # PEFT-wrapped, B = 0: same routing
    if start == "loaded":  # a non-zero adapter: the A slices must be masked too, not only B
        gen = torch.Generator().manual_seed(3)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    masked = restrict_expert_training(model, chosen)
    assert masked and all(".layers.1.mlp.experts." in n and ("lora_A" in n or "lora_B" in n) for n in masked)
    assert len(masked) == 4  # A and B of gate_up_proj and down_proj
    assert any(p.requires_grad for n, p in model.named_parameters() if "self_attn" in n and "lora_" in n)
    before, deltas = _snapshot(model), _expert_deltas(model)
    assert len(deltas) == 2
    _train(model, masked, batches)
    after, new_deltas = _snapshot(model), _expert_deltas(model)
    for name, delta in deltas.items():
        change = new_deltas[name] - delta
        for e in unselected:
            assert torch.equal(new_deltas[name][e], delta[e]), (name, e)
            assert torch.count_nonzero(change[e]) == 0
            if start == "fresh":
                assert torch.count_nonzero(new_deltas[name][e]) == 0
        for e in chosen[1]:
            assert torch.count_nonzero(change[e]) > 0, (name, e)
    base = [n for n in before if "base_layer" in n and n.endswith(("gate_up_proj", "down_proj"))]
    router = [n for n in before if n.endswith("mlp.gate.weight")]
    assert base and router and all(torch.equal(after[n], before[n]) for n in base + router)
    attention = [n for n in before if "self_attn" in n and "lora_B" in n]
    assert any(not torch.equal(after[n], before[n]) for n in attention)  # lora_target's adapters still train


def test_parse_expert_ids(tiny_ds):
    layers = moe_layers(_load(tiny_ds))
    assert parse_expert_ids("0,3,5", layers) == {1: [0, 3, 5]}
    assert parse_expert_ids("1:5,0-2", layers) == {1: [0, 1, 2, 5]}
    assert parse_expert_ids(" 1:4-7 ; 1:0 ", layers) == {1: [0, 4, 5, 6, 7]}
    cases = {"8": "8.*0 to 7", "1:2,9": "9.*0 to 7", "0:1": "layer 0.*MoE layers: 1", "a,b": "'a'",
             "5-2": "'5-2'", "1:": "'1:'", "": "''", "x:1": "'x:1'"}
    for spec, detail in cases.items():
        with pytest.raises(UserError, match=f"config key 'expert_ids' in run.yaml: .*{detail}"):
            parse_expert_ids(spec, layers, source="run.yaml")


def test_read_domain_map(tiny_ds, tmp_path):
    layers = moe_layers(_load(tiny_ds))
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"law": [2, 0], "finance": {"1": [4, 5]}, "bad": [8], "dense": {"0": [1]},
                                "text": "0,1"}))
    assert read_domain_map(path, "law", layers) == {1: [0, 2]}
    assert read_domain_map(path, "finance", layers) == {1: [4, 5]}
    (tmp_path / "broken.json").write_text("{law: [1]")
    cases = [(tmp_path / "missing.json", "law", "'expert_domain_map'.*not found"),
             (tmp_path / "broken.json", "law", "'expert_domain_map'.*not readable JSON"),
             (path, "medicine", "'expert_domain'.*known domains: bad, dense, finance, law, text"),
             (path, "bad", "'expert_domain_map'.*id 8 .*0 to 7"),
             (path, "dense", "'expert_domain_map'.*layer 0.*MoE layers: 1"),
             (path, "text", "'expert_domain_map'.*list of expert ids")]
    for file, domain, detail in cases:
        with pytest.raises(UserError, match=detail):
            read_domain_map(file, domain, layers)


def test_expert_load_table_values():
    counts = torch.tensor([[10, 0, 30, 60], [25, 25, 25, 25], [0, 0, 0, 0]])
    skewed, even, idle = expert_load_table(counts, [1, 2, 3])
    assert skewed["layer"] == 1 and skewed["tokens"] == 100 and skewed["max_share"] == pytest.approx(0.6)
    assert skewed["cv"] == pytest.approx(math.sqrt(525) / 25)
    entropy = -(0.1 * math.log(0.1) + 0.3 * math.log(0.3) + 0.6 * math.log(0.6)) / math.log(4)
    assert skewed["entropy"] == pytest.approx(entropy)
    assert [e for e, _ in skewed["top"]] == [3, 2, 0]
    assert [s for _, s in skewed["top"]] == pytest.approx([0.6, 0.3, 0.1])
    assert even["cv"] == 0 and even["entropy"] == pytest.approx(1.0) and [e for e, _ in even["top"]] == [0, 1, 2]
    assert idle["tokens"] == 0 and idle["max_share"] == 0 and idle["entropy"] == 0 and idle["cv"] == 0
