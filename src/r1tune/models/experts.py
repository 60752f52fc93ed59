"""Expert-selective tuning for MoE models (DeepSeek-V3 in transformers 5): train only chosen experts.

Experts are chosen by id (`expert_ids`), by a JSON domain map, or by how often a data set routes to
them (`routing_counts` + `top_k_experts`, ESFT-style). The routed experts live in fused 3-D tensors
(`mlp.experts.gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)), so one expert cannot be frozen by
requires_grad: gradient hooks zero the unselected experts' slices instead. With PEFT LoRA on the
fused tensors (`target_parameters`) the slices are in the LoRA factors, in PEFT's layout:
lora_A.weight (r·E, in) viewed (E, r, in): expert e owns rows e·r … e·r+r-1;
lora_B.weight (out, r·E) viewed (out, r, E): expert e owns columns e, e+E, e+2E, … (strided).
Masked gradients alone do not keep a slice fixed: decoupled weight decay still shrinks it, so the
names `restrict_expert_training` returns must go to a no-decay optimizer group.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from r1tune.errors import UserError
from r1tune.models.run_state import MethodState

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp$")


def moe_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder layer index -> its MoE mlp (has .experts and .gate); empty for dense models."""
    found = {}
    for name, module in model.named_modules():
        m = _LAYER.search(name)
        if m and hasattr(module, "experts") and hasattr(module, "gate"):
            found[int(m.group(1))] = module
    return dict(sorted(found.items()))


def _base_experts(mlp: nn.Module) -> nn.Module:
    """The fused-experts module under any PEFT ParamWrapper chain."""
    module = mlp.experts
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def _n_experts(mlp: nn.Module) -> int:
    return _base_experts(mlp).gate_up_proj.shape[0]


def _error(key: str, source: str, text: str) -> UserError:
    return UserError(f"config key '{key}'{'' if source == 'config' else f' in {source}'}: {text}")


def _check_ids(ids, layer, layers: dict, key: str, source: str, what: str) -> list[int]:
    if layer not in layers:
        known = ", ".join(map(str, layers)) or "none"
        raise _error(key, source, f"{what} names layer {layer!r}, which is not an MoE layer; MoE layers: {known}")
    n = _n_experts(layers[layer])
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise _error(key, source, f"{what} has expert id {bad[0]!r} for layer {layer}; use ids from 0 to {n - 1}")
    return sorted(set(ids))


def _parse_ids(text: str, source: str) -> list[int]:
    ids = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise _error("expert_ids", source, f"cannot read '{part.strip()}'; write ids like '0,3,5' or '4-7', "
                         "or per layer like '1:0,3;2:4-7'")
        ids += range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1)
    return ids


def parse_expert_ids(spec: str, layers: dict, source: str = "config") -> dict[int, list[int]]:
    """'0,3,5' (every MoE layer) or '1:0,3;2:4-7' (per layer) -> {layer: sorted ids}."""
    if not layers:
        raise _error("expert_ids", source, "the model has no MoE layers to select experts in")
    spec = str(spec).strip()
    if ":" not in spec:
        ids = _parse_ids(spec, source)
        return {layer: _check_ids(ids, layer, layers, "expert_ids", source, f"'{spec}'") for layer in layers}
    chosen: dict[int, list[int]] = {}
    for group in filter(str.strip, spec.split(";")):
        head, _, ids = (part.strip() for part in group.partition(":"))
        if not head.isdigit() or not ids:
            raise _error("expert_ids", source, f"cannot read '{group.strip()}'; write 'layer:ids' groups like "
                         f"'1:0,3;2:4-7' (MoE layers: {', '.join(map(str, layers))})")
        merged = chosen.get(int(head), []) + _parse_ids(ids, source)
        chosen[int(head)] = _check_ids(merged, int(head), layers, "expert_ids", source, f"'{group.strip()}'")
    return dict(sorted(chosen.items()))


def read_domain_map(path, domain: str, layers: dict, source: str = "config") -> dict[int, list[int]]:
    """{"law": [ids] (every MoE layer) or {"layer": [ids]}, ...} from a JSON file -> {layer: ids}."""
    key, shape = "expert_domain_map", '{"domain": [expert ids] or {"layer": [expert ids]}}'
    if not path:
        raise _error(key, source, f"is empty; give a JSON file like {shape} for expert_domain '{domain}'")
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _error(key, source, f"file '{path}' not found; give the path of a JSON file like {shape}") from None
    except (ValueError, OSError) as exc:
        raise _error(key, source, f"'{path}' is not readable JSON ({exc}); write it like {shape}") from None
    if not isinstance(table, dict) or domain not in table:
        known = ", ".join(sorted(table)) if isinstance(table, dict) else "none (the file is not a JSON object)"
        raise _error("expert_domain", source, f"no domain '{domain}' in '{path}'; known domains: {known}")
    entry, what = table[domain], f"domain '{domain}' of '{path}'"
    if isinstance(entry, list):
        entry = {str(layer): entry for layer in layers}
    if not isinstance(entry, dict) or not all(isinstance(v, list) for v in entry.values()):
        raise _error(key, source, f"{what} must be a list of expert ids or an object like {{\"1\": [0, 3]}}")
    layer_of = {k: int(k) if k.isdigit() else k for k in entry}  # JSON keys are strings
    for k in entry:
        _check_ids(entry[k], layer_of[k], layers, key, source, what)
    return {layer_of[k]: sorted(set(entry[k])) for k in sorted(entry, key=layer_of.get)}


def routing_counts(model: nn.Module, batches, progress=None) -> torch.Tensor:
    """(n_moe_layers, n_experts) int64: non-pad tokens each MoE layer routed to each expert.

    Counts the routing the experts module is actually called with (a pre-hook on mlp.experts, which
    receives top_k_index for every token); `progress(batches_done)` is called after each batch."""
    layers = moe_layers(model)
    n = max((_n_experts(m) for m in layers.values()), default=0)
    counts = torch.zeros(len(layers), n, dtype=torch.int64)
    keep: list = [None]  # the current batch's non-pad positions, flattened

    def hook(row):
        def pre(module, args, kwargs):
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            index = index.reshape(-1, index.shape[-1])
            if keep[0] is not None:
                if keep[0].numel() != index.shape[0]:
                    raise RuntimeError(f"{index.shape[0]} routed tokens but {keep[0].numel()} mask positions")
                index = index[keep[0].to(index.device)]
            # n + 1 bins: some experts implementations route dropped tokens to id n
            counts[row] += torch.bincount(index.reshape(-1).cpu(), minlength=n + 1)[:n]
        return pre

    modes = {m: m.training for m in model.modules()}
    handles = [mlp.experts.register_forward_pre_hook(hook(row), with_kwargs=True)
               for row, mlp in enumerate(layers.values())]
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            for done, batch in enumerate(batches, 1):
                inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
                mask = inputs.get("attention_mask")
                keep[0] = mask.reshape(-1).bool() if mask is not None else None
                model(**inputs, use_cache=False)
                if progress is not None:
                    progress(done)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return counts


def top_k_experts(counts: torch.Tensor, layer_ids, k: int) -> dict[int, list[int]]:
    """The k most-routed experts per layer, busiest first (ties go to the lower id)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    order = torch.sort(-counts, dim=1, stable=True).indices[:, :k]
    return {layer: order[row].tolist() for row, layer in enumerate(layer_ids)}


def _mask(param: nn.Parameter, keep: torch.Tensor):
    """Train param with its gradient zeroed wherever keep is False; returns the hook's handle."""
    param.requires_grad = True
    drop = ~keep.to(param.device)
    return param.register_hook(lambda grad: grad.masked_fill(drop, 0))


def _lora_wrappers(mlp: nn.Module) -> list[nn.Module]:
    chain, module = [], mlp.experts
    while hasattr(module, "base_layer") and hasattr(module, "lora_A"):
        chain.append(module)
        module = module.base_layer
    return chain


def _lora_masks(wrapper: nn.Module, selected: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(param, keep) for every active adapter's per-expert slices of lora_A rows and lora_B columns (layout above)."""
    masks, experts = [], wrapper.num_experts
    for name in [a for a in wrapper.active_adapters if a in wrapper.lora_A]:
        a, b = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight
        rank = a.shape[0] // experts
        masks.append((a, selected.repeat_interleave(rank)[:, None]))  # row e*r + k belongs to expert e
        masks.append((b, selected.repeat(rank)[None, :]))              # column k*E + e belongs to expert e
    return masks


def restrict_expert_training(model: nn.Module, selection: dict[int, list[int]], train_router: bool = False,
                             state: MethodState | None = None) -> set[str]:
    """Train only the selected routed experts; returns the names of gradient-masked parameters.

    Plain model: everything else is frozen, and the selected layers' fused expert tensors train with
    the unselected experts' gradient slices zeroed. PEFT model: adapters outside the routed experts
    keep the requires_grad lora_target gave them; LoRA on the fused experts is masked per expert
    (or, where the experts carry no LoRA, the fused tensors are). Routers of the selected layers
    train only when train_router; layers with no selection stay frozen. The masks' hooks and trained
    shares go into `state` (the run's record): restricting again with the same state replaces them."""
    state = MethodState() if state is None else state
    layers = moe_layers(model)
    selection = {layer: _check_ids(list(ids), layer, layers, "expert_ids", "config", "the selection")
                 for layer, ids in selection.items()}
    for name in list(state.expert_hooks):  # restricting twice must not stack masks
        state.expert_hooks.pop(name).remove()
        state.trained_share.pop(name, None)
    if not hasattr(model, "peft_config"):
        for param in model.parameters():
            param.requires_grad = False
    masks: list[tuple[nn.Parameter, torch.Tensor]] = []
    for layer, mlp in layers.items():
        ids = selection.get(layer, [])
        wrappers, base = _lora_wrappers(mlp), _base_experts(mlp)
        for param in list(mlp.experts.parameters()) + list(mlp.gate.parameters()):
            param.requires_grad = False
        if not ids:
            continue
        selected = torch.zeros(_n_experts(mlp), dtype=torch.bool)
        selected[ids] = True
        for wrapper in wrappers:
            masks += _lora_masks(wrapper, selected)
        if not wrappers:
            masks += [(param, selected[:, None, None]) for param in (base.gate_up_proj, base.down_proj)]
        for param in mlp.gate.parameters():
            param.requires_grad = train_router
    names = {id(param): name for name, param in model.named_parameters()}
    for param, keep in masks:
        name = names[id(param)]
        state.expert_hooks[name] = _mask(param, keep)
        state.trained_share[name] = keep.float().mean().item()  # for the trainable-parameter count
    return {names[id(param)] for param, _ in masks}


def expert_load_table(counts: torch.Tensor, layer_ids) -> list[dict]:
    """Per layer: routed tokens, busiest expert's share, coefficient of variation, entropy in [0, 1]
    (1 = perfectly even), and the top-3 experts as (id, share). Each token counts once per expert."""
    rows = []
    for row, layer in zip(counts.to(torch.float64), layer_ids):
        total = row.sum().item()
        share = row / total if total else torch.zeros_like(row)
        mean = row.mean().item()
        entropy = -(share[share > 0] * share[share > 0].log()).sum().item()
        top = torch.sort(-row, stable=True).indices[:3].tolist()
        rows.append({"layer": int(layer), "tokens": int(total), "max_share": share.max().item() if total else 0.0,
                     "cv": row.std(unbiased=False).item() / mean if mean else 0.0,
                     "entropy": entropy / math.log(len(row)) if len(row) > 1 else 0.0,
                     "top": [(e, share[e].item()) for e in top]})
    return rows
