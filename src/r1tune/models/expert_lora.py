"""LoRA on fused MoE experts computed in low rank: x·Wₑᵀ + s·(x·Aₑᵀ)·Bₑᵀ per expert group.

PEFT (0.21) adapts a fused expert stack (DeepSeek-V3's `mlp.experts.gate_up_proj`, shape
(experts, out, in)) by re-parametrizing the weight as W + s·B·A on every forward: a new
full-size fp32 copy of every expert stack per layer, kept for the backward pass, plus its
full-size gradient. `bench/expert_lora.py` (1,024 tokens, rank 16): 64 experts of 1024×512 keep
456 MB for backward that way against 81 MB here, at 0.94 vs 0.40 s; with DeepSeek-V3's own 256
experts of 7168×2048 the fp32 copies alone would be ~45 GB per layer.

Here the routed tokens, sorted by expert, go through three grouped matmuls instead: the frozen
stack as it is, then the rank-r factors (tokens × r in between). Only the tokens and the small
factors are kept for backward. PEFT's modules, parameter layout and saved files are untouched:
the outermost `ParamWrapper` of each expert module gets this forward, and falls back to PEFT's
own whenever it is not plain single-adapter LoRA (merged, adapters disabled, several adapters).
"""

from __future__ import annotations

import torch
from torch import nn

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def _wrapper_class():
    from peft.tuners.lora.layer import ParamWrapper

    return ParamWrapper


def expert_wrapper_chains(model: nn.Module) -> list[list[nn.Module]]:
    """For each fused-expert module PEFT wrapped: its ParamWrapper chain, outermost first."""
    wrapper = _wrapper_class()
    inner = {id(m.base_layer) for m in model.modules() if isinstance(m, wrapper)}
    chains = []
    for module in model.modules():
        if isinstance(module, wrapper) and id(module) not in inner:
            chain = [module]
            while isinstance(chain[-1].base_layer, wrapper):
                chain.append(chain[-1].base_layer)
            chains.append(chain)
    return chains


def supported(experts: nn.Module, chain: list[nn.Module]) -> bool:
    """The layout this path implements: gated, untransposed, bias-free experts on one device."""
    layout = (getattr(experts, "has_gate", False) and not getattr(experts, "has_bias", True)
              and not getattr(experts, "is_transposed", True) and not getattr(experts, "has_post_expert_norm", True)
              and not getattr(experts, "_is_expert_parallel", True))
    return layout and all(w.parameter_name in EXPERT_PARAMS and w._did_swap_in_out_features for w in chain)


def active_factors(chain: list[nn.Module]) -> dict | None:
    """{parameter name: (A (E, r, in), B (E, r, out) transposed for grouped_mm, scaling)}, or None
    when PEFT's own forward must run (merged, disabled, or not exactly one active adapter)."""
    factors = {}
    for wrapper in chain:
        adapters = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
        if wrapper.merged or wrapper.disable_adapters or len(adapters) != 1:
            return None
        name = adapters[0]
        a, b, experts = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight, wrapper.num_experts
        a = a.reshape(experts, -1, a.shape[-1])           # (E, r, in)
        b = b.reshape(b.shape[0], -1, experts)            # (out, r, E), PEFT's layout
        factors[wrapper.parameter_name] = (a, b.permute(2, 1, 0).contiguous(), wrapper.scaling[name])
    return factors


def _grouped(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x (S, k) @ weight (E, k, n) per group of rows -> (S, n), in the weight's dtype.

    transformers' dispatcher: torch's grouped_mm where it runs for this device and dtype, else its fallback."""
    from transformers.integrations.moe import _grouped_mm

    return _grouped_mm(x, weight, offs=offsets)


def _lora_linear(x, weight, factors, offsets):
    """x @ Wₑᵀ + s · (x @ Aₑᵀ) @ Bₑᵀ for each expert's rows; W is (E, out, in)."""
    out = _grouped(x, weight.transpose(-2, -1), offsets)
    if factors is None:
        return out
    a, b, scaling = factors
    low = _grouped(_grouped(x, a.transpose(-2, -1).to(weight.dtype), offsets), b.to(weight.dtype), offsets)
    return out + scaling * low


def lowrank_experts_forward(experts, factors, hidden_states, top_k_index, top_k_weights):
    """transformers' grouped_mm experts forward with low-rank LoRA terms (same routing and order)."""
    num_top_k, num_tokens = top_k_index.size(-1), hidden_states.size(0)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    rows = hidden_states[perm // num_top_k]
    weights = top_k_weights.reshape(-1)[perm]
    counts = torch.bincount(expert_ids, minlength=experts.num_experts)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    up = _lora_linear(rows, experts.gate_up_proj, factors.get("gate_up_proj"), offsets)
    down = _lora_linear(experts._apply_gate(up), experts.down_proj, factors.get("down_proj"), offsets)
    weighted = down * weights.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    out = weighted[inverse].view(num_tokens, num_top_k, -1).sum(dim=1)
    return out.to(hidden_states.dtype)


def _lowrank_forward(chain: list[nn.Module], peft_forward):
    experts = chain[-1].base_layer

    def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        factors = None if args or kwargs else active_factors(chain)
        if factors is None:
            return peft_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        return lowrank_experts_forward(experts, factors, hidden_states, top_k_index, top_k_weights)

    return forward


def use_lowrank_experts(model: nn.Module) -> int:
    """Give every supported PEFT-wrapped expert module the low-rank forward; returns how many."""
    try:
        from transformers.integrations.moe import _grouped_mm  # noqa: F401
    except ImportError:  # another transformers: PEFT's path stays
        return 0
    count = 0
    for chain in expert_wrapper_chains(model):
        outer, experts = chain[0], chain[-1].base_layer
        if supported(experts, chain):
            outer.forward = _lowrank_forward(chain, outer.forward)
            count += 1
    return count
