"""AdaLoRA through PEFT: LoRA in SVD form whose rank budget moves to the modules that matter.

Every module starts at `adalora_init_r`; after `tinit` warmup steps the least important
singular values are masked until the average rank reaches `adalora_target_r` (cubic
budget schedule), and for the last `tfinal` steps the allocation is fixed. PEFT adds the
orthogonality penalty only when the model computes the loss itself; r1tune computes the
loss, so `orthogonal_penalty()` adds it here. The final allocation is written to
output_dir/adalora_ranks.json and plotted to adalora_ranks.png.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from r1tune.fileio import save_figure, write_text_atomic


def adalora_config(cfg, targets, total_steps: int):
    from peft import AdaLoraConfig

    tinit = cfg.adalora_tinit if cfg.adalora_tinit is not None else total_steps // 10
    tfinal = cfg.adalora_tfinal if cfg.adalora_tfinal is not None else total_steps // 5
    if tinit + tfinal >= total_steps:
        from r1tune.errors import UserError

        raise UserError(f"{cfg.source}: adalora_tinit ({tinit}) + adalora_tfinal ({tfinal}) leave no steps to "
                        f"re-allocate ranks in a run of {total_steps} steps; lower them or train longer")
    pattern = "|".join(re.escape(n) for n in targets.modules) or "^$"
    return AdaLoraConfig(init_r=cfg.adalora_init_r, target_r=cfg.adalora_target_r, tinit=tinit, tfinal=tfinal,
                         deltaT=cfg.adalora_delta_t, beta1=cfg.adalora_beta1, beta2=cfg.adalora_beta2,
                         orth_reg_weight=cfg.adalora_orth_reg_weight, total_step=total_steps,
                         lora_alpha=cfg.effective_lora_alpha, lora_dropout=cfg.lora_dropout,
                         target_modules=pattern, task_type="CAUSAL_LM")


def is_adalora(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return config is not None and config.peft_type.value == "ADALORA"


def orthogonal_penalty(model) -> torch.Tensor | float:
    """orth_reg_weight x mean ||PᵀP − I||_F over the SVD factors (as PEFT's own forward would add)."""
    weight = model.active_peft_config.orth_reg_weight
    terms = [torch.linalg.matrix_norm((p @ p.T if "lora_A" in n else p.T @ p) - torch.eye(
        p.shape[0] if "lora_A" in n else p.shape[1], device=p.device, dtype=p.dtype))
        for n, p in model.named_parameters() if p.requires_grad and ("lora_A" in n or "lora_B" in n)]
    return weight * torch.stack(terms).mean() if terms and weight > 0 else 0.0


def update_ranks(model, step: int) -> None:
    """PEFT's budget step: call after optimizer.step() and before zero_grad() (it reads the gradients)."""
    model.base_model.update_and_allocate(step)


def rank_allocation(model) -> dict[str, int]:
    """Module name -> rank kept (non-masked singular values)."""
    ranks = {}
    for name, module in model.named_modules():
        e = getattr(module, "lora_E", None)
        if isinstance(e, nn.ParameterDict) and model.active_adapter in e:
            short = name.replace("base_model.model.", "")
            ranks[short] = int((e[model.active_adapter].detach() != 0).sum())
    return ranks


def write_rank_report(model, out: Path) -> tuple[Path, Path | None]:
    """adalora_ranks.json (+ .png bar chart); returns the paths."""
    ranks = rank_allocation(model)
    config = model.active_peft_config
    report = {"init_r": config.init_r, "target_r": config.target_r, "ranks": ranks,
              "mean_rank": sum(ranks.values()) / max(len(ranks), 1)}
    path = out / "adalora_ranks.json"
    write_text_atomic(path, json.dumps(report, indent=2))
    return path, plot_ranks(ranks, config.init_r, out / "adalora_ranks.png")


def plot_ranks(ranks: dict[str, int], init_r: int, png: Path) -> Path | None:
    if not ranks:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ranks)
    fig, ax = plt.subplots(figsize=(8, max(3, 0.22 * len(names))))
    ax.barh(range(len(names)), [ranks[n] for n in names], color="#4c72b0")
    ax.set_yticks(range(len(names)), [n.removeprefix("model.layers.") for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(init_r, color="grey", linestyle=":", label=f"initial rank {init_r}")
    ax.set_xlabel("rank kept")
    ax.set_title("AdaLoRA rank allocation per module")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return save_figure(fig, png)
