"""MoE expert-selective tuning for a run: choose experts from the config, restrict training to them,
and log how the data's tokens spread over the experts before and after training.

The mechanics (routing pass, gradient masks inside the fused expert tensors) live in
experts.py; this module turns config keys into a selection and writes expert_load.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from r1tune.errors import UserError
from r1tune.fileio import write_text_atomic
from r1tune.models import experts as moe
from r1tune.models.run_state import MethodState
from r1tune.ui import console

EXPERT_LOAD_FILE = "expert_load.json"
ROUTING_SAMPLES = 256  # records of the training data used for a routing pass


@dataclass
class ExpertRun:
    selection: dict[int, list[int]]
    no_decay: frozenset[str]
    batches: list[dict] = field(repr=False)
    before: list[dict] = field(default_factory=list)

    def finish(self, model, out: Path) -> None:
        """Routing after training, logged next to the routing before it; writes expert_load.json."""
        layers = moe.moe_layers(model)
        after = moe.expert_load_table(routing_pass(model, self.batches), list(layers))
        _print_load("expert load after training", after)
        report = {"selection": {str(k): v for k, v in self.selection.items()}, "before": self.before, "after": after}
        write_text_atomic(out / EXPERT_LOAD_FILE, json.dumps(report, indent=2))


def routing_pass(model, batches) -> torch.Tensor:
    return moe.routing_counts(model, tqdm(batches, desc="routing pass", unit="batch", leave=False))


def wants_selection(cfg) -> bool:
    return any(getattr(cfg, k) is not None for k in ("expert_ids", "expert_domain", "expert_top_k"))


def select_experts(model, cfg, data, pad_id: int, new_token_ids=(),
                   state: MethodState | None = None) -> ExpertRun | None:
    """Restrict training to the configured experts (None when the config selects none); the masks go in `state`."""
    if not wants_selection(cfg):
        return None
    layers = moe.moe_layers(model)
    if not layers:
        raise UserError(f"{cfg.source}: expert selection (expert_ids / expert_domain / expert_top_k) needs a "
                        f"mixture-of-experts model, and {model.config.model_type} has no routed experts; remove the key")
    batches = routing_batches(data.train, pad_id, cfg.per_device_eval_batch_size)
    counts = routing_pass(model, batches)
    before = moe.expert_load_table(counts, list(layers))
    _print_load("expert load before training", before)
    selection = _selection(cfg, layers, counts)
    no_decay = moe.restrict_expert_training(model, selection, cfg.train_router, state)
    if new_token_ids and not hasattr(model, "peft_config"):  # new rows start from a mean: they must train
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            layer.weight.requires_grad = True
    console.print("training experts " + "; ".join(f"layer {k}: {v}" for k, v in selection.items())
                  + (" and the router" if cfg.train_router else " (router frozen)"))
    return ExpertRun(selection, frozenset(no_decay), batches, before)


def _selection(cfg, layers, counts) -> dict[int, list[int]]:
    if cfg.expert_ids is not None:
        return moe.parse_expert_ids(str(cfg.expert_ids), layers, cfg.source)
    if cfg.expert_domain is not None:
        return moe.read_domain_map(cfg.expert_domain_map, cfg.expert_domain, layers, cfg.source)
    experts = counts.shape[1]
    if cfg.expert_top_k >= experts:
        raise UserError(f"{cfg.source}: expert_top_k is {cfg.expert_top_k} but the MoE layers have {experts} routed "
                        f"experts; choose fewer than {experts} (or finetuning_type full without expert keys)")
    return moe.top_k_experts(counts, list(layers), cfg.expert_top_k)


def routing_batches(examples, pad_id: int, size: int) -> list[dict]:
    """Right-padded batches of (up to ROUTING_SAMPLES) training rows for a routing pass.

    Routing is per token, so packed rows are routed as they are; the 2-D mask only marks padding."""
    chosen = examples[:ROUTING_SAMPLES]
    out = []
    for i in range(0, len(chosen), size):
        rows = [torch.tensor(e.input_ids) for e in chosen[i:i + size]]
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _print_load(title: str, table: list[dict]) -> None:
    from rich.table import Table

    view = Table(title=title)
    for column in ("layer", "tokens", "busiest share", "CV", "entropy", "top experts"):
        view.add_column(column)
    for row in table:
        top = ", ".join(f"{e}: {s:.0%}" for e, s in row["top"])
        view.add_row(str(row["layer"]), f"{row['tokens']:,}", f"{row['max_share']:.1%}", f"{row['cv']:.2f}",
                     f"{row['entropy']:.2f}", top)
    console.print(view)
