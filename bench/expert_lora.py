"""LoRA on fused MoE experts: PEFT's per-forward W + s·B·A vs r1tune's low-rank grouped matmuls.

    python bench/expert_lora.py

One DeepSeek-V3 expert stack (transformers' DeepseekV3Experts, gate_up_proj and down_proj adapted by
PEFT `target_parameters`, rank 16, fp32 as PEFT runs it) takes 1,024 tokens routed top-k; forward +
backward, the two paths alternating after a warm-up. Printed per size: the memory kept for backward
(saved tensors that are not parameters), step time, and the largest output and LoRA-gradient
differences. The sizes are the tiny bench model's experts and a larger stack (64 experts, 1024 x 512)
that is still far below DeepSeek-V3's own 256 experts of 7168 x 2048.
"""

from __future__ import annotations

import time

import torch
from torch import nn

SIZES = [("tiny bench model", 8, 2, 448, 224), ("64 experts 1024x512", 64, 6, 1024, 512)]
TOKENS, RANK, REPEATS = 1024, 16, 5


class Block(nn.Module):
    def __init__(self, experts: int, hidden: int, inner: int):
        super().__init__()
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

        config = DeepseekV3Config(hidden_size=hidden, moe_intermediate_size=inner, n_routed_experts=experts)
        config._experts_implementation = "grouped_mm"
        self.experts = DeepseekV3Experts(config)
        nn.init.normal_(self.experts.gate_up_proj, std=0.02)
        nn.init.normal_(self.experts.down_proj, std=0.02)

    def forward(self, x, index, weights):
        return self.experts(x, index, weights)


def build(experts: int, hidden: int, inner: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(Block(experts, hidden, inner),
                           LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=[],
                                      target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.02)
    return model


def step(model, x, index, weights):
    model.zero_grad()
    saved = []
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage()) or t, lambda t: t):
        out = model(x, index, weights)
    out.square().sum().backward()
    kept = {s.data_ptr(): s.nbytes() for s in saved if s.data_ptr() not in params}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["input"], x.grad = x.grad.clone(), None
    return out.detach(), grads, sum(kept.values())


def timed(model, inputs) -> float:
    start = time.perf_counter()
    model.zero_grad()
    model(*inputs).square().sum().backward()
    inputs[0].grad = None
    return time.perf_counter() - start


def main() -> None:
    from r1tune.models.expert_lora import expert_wrapper_chains, use_lowrank_experts

    print(f"{'experts':<22}{'PEFT kept':>11}{'low-rank kept':>15}{'PEFT s':>9}{'low-rank s':>12}"
          f"{'out diff':>10}{'grad diff':>11}")
    for label, experts, top_k, hidden, inner in SIZES:
        model = build(experts, hidden, inner)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(TOKENS, hidden, generator=gen).requires_grad_()  # as inside a model with LoRA below
        weights, index = torch.randn(TOKENS, experts, generator=gen).softmax(-1).topk(top_k)
        outer = expert_wrapper_chains(model)[0][0]
        peft_forward = outer.forward
        use_lowrank_experts(model)
        lowrank_forward = outer.forward
        results, times = {}, {"peft": 0.0, "lowrank": 0.0}
        for path, forward in (("peft", peft_forward), ("lowrank", lowrank_forward)):
            outer.forward = forward
            results[path] = step(model, x, index, weights)
        for _ in range(REPEATS):
            for path, forward in (("peft", peft_forward), ("lowrank", lowrank_forward)):
                outer.forward = forward
                times[path] += timed(model, (x, index, weights))
        (ref, ref_grads, ref_kept), (out, grads, kept) = results["peft"], results["lowrank"]
        grad_diff = max((grads[k] - ref_grads[k]).abs().max().item() for k in grads)
        print(f"{label:<22}{ref_kept / 2**20:>9.1f}MB{kept / 2**20:>13.1f}MB{times['peft'] / REPEATS:>9.3f}"
              f"{times['lowrank'] / REPEATS:>12.3f}{(out - ref).abs().max().item():>10.1e}{grad_diff:>11.1e}")


if __name__ == "__main__":
    main()
