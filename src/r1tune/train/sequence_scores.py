"""Per-sequence quantities the preference and reward stages train on: the summed log-probability of
each row's labelled tokens (and their count), and the last hidden state of each row's last token;
and per token, for GRPO, each labelled token's log-probability and the entropy at its position.

Only labelled positions are scored through the output head (never the full logits of every
position), so memory follows the answers' length, not the prompt's.
"""

from __future__ import annotations

import sys

import torch
from torch.utils.checkpoint import checkpoint

from r1tune.data.encode import IGNORE
from r1tune.train import batching
from r1tune.train.held_out import choose_loss_path


class SequenceScorer:
    """model + batch -> per-row log-probabilities, token counts and hidden states."""

    def __init__(self, model, chunked: bool | None = None):
        self.model, self.split = model, choose_loss_path(model, chunked)
        self.aux = router_aux(model)

    def hidden_and_head(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(last hidden states (rows, seq, dim), head weight), or (logits, None) when the head is not plain."""
        inputs = {**batching.model_inputs(batch), "use_cache": False}
        if self.split is not None:
            decoder, head = self.split
            return decoder(**inputs).last_hidden_state, head.weight
        return self.model(**inputs).logits, None

    def last_hidden(self, batch: dict) -> torch.Tensor:
        """(rows, seq, dim) hidden states of the last layer."""
        inputs = {**batching.model_inputs(batch), "use_cache": False}
        if self.split is not None:
            return self.split[0](**inputs).last_hidden_state
        return self.model(**inputs, output_hidden_states=True).hidden_states[-1]

    def logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probability of each row's labelled tokens (fp32), labelled tokens per row)."""
        states, weight = self.hidden_and_head(batch)
        return label_logps(states, weight, batch["labels"], batch.get("row_ids"))

    def token_logps(self, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """token_logps of the batch's labelled tokens under the model."""
        states, weight = self.hidden_and_head(batch)
        return token_logps(states, weight, batch["labels"], temperature)

    def token_logps_and_aux(self, batch: dict, temperature: float = 1.0
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """token_logps, and the router's load-balancing loss times its coefficient on MoE models that train
        with one (None elsewhere)."""
        if self.aux is None:
            return *self.token_logps(batch, temperature), None
        inputs = {**batching.model_inputs(batch), "use_cache": False, "output_router_logits": True}
        balance, coef = self.aux
        config = self.model.config
        experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
        if self.split is not None:
            out = self.split[0](**inputs)
            states, weight = out.last_hidden_state, self.split[1].weight
        else:
            out = self.model(**inputs)
            states, weight = out.logits, None
        aux = balance(out.router_logits, experts, config.num_experts_per_tok, batch.get("attention_mask"))
        return *token_logps(states, weight, batch["labels"], temperature), coef * aux


def label_logps(states: torch.Tensor, weight: torch.Tensor | None, labels: torch.Tensor,
                row_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: sum of log p(label) over labelled positions (next-token shift) and their count.
    `states` are hidden states scored through `weight`, or logits when weight is None. With packed
    rows (batching.collate_packed), `row_ids` says which original row each token belongs to."""
    states = states[:, states.size(1) - labels.size(1):]  # prompt tuning's virtual tokens come first
    mask = labels[:, 1:] != IGNORE
    rows = states[:, :-1][mask]
    targets = labels[:, 1:][mask]
    logits = rows if weight is None else rows @ weight.to(rows.dtype).T
    token_logps = logits.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    if row_ids is None:
        owner, count = mask.nonzero()[:, 0], labels.size(0)
    else:
        owner, count = row_ids[:, 1:][mask], int(row_ids.max()) + 1
    sums = torch.zeros(count, dtype=torch.float32, device=labels.device).index_add(0, owner, token_logps)
    return sums, torch.zeros(count, dtype=torch.long, device=labels.device).index_add(0, owner, torch.ones_like(owner))


def router_aux(model) -> tuple | None:
    """(the model family's load-balancing loss function, router_aux_loss_coef) for MoE models trained with
    one (Mixtral, Qwen2-MoE, Qwen3-MoE, ...); None for the rest (DeepSeek-V3 balances experts without one)."""
    config = getattr(model, "config", None)
    coef = getattr(config, "router_aux_loss_coef", 0) or 0
    if not coef or not hasattr(config, "output_router_logits") or not hasattr(config, "num_experts_per_tok"):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    func = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
    return (func, coef) if func is not None else None


TOKEN_CHUNK = 1024  # labelled tokens scored through the head at once


def token_logps(states: torch.Tensor, weight: torch.Tensor | None, labels: torch.Tensor, temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label) of every labelled token under logits / temperature (fp32, with gradient), the entropy
    of that distribution at each (no gradient)), flat in row-major order of the labelled positions.

    Tokens go through the head TOKEN_CHUNK at a time; with more than one chunk each is recomputed in the
    backward pass, so only one chunk's logits over the vocabulary are ever held."""
    states = states[:, states.size(1) - labels.size(1):]  # prompt tuning's virtual tokens come first
    mask = labels[:, 1:] != IGNORE
    rows, targets = states[:, :-1][mask], labels[:, 1:][mask]
    if rows.size(0) <= TOKEN_CHUNK:
        return _chunk_logps(rows, weight, targets, temperature)
    parts = [checkpoint(_chunk_logps, rows[i:i + TOKEN_CHUNK], weight, targets[i:i + TOKEN_CHUNK], temperature,
                        use_reentrant=False) for i in range(0, rows.size(0), TOKEN_CHUNK)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _chunk_logps(rows: torch.Tensor, weight: torch.Tensor | None, targets: torch.Tensor, temperature: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = rows if weight is None else rows @ weight.to(rows.dtype).T
    logps = (logits.float() / temperature).log_softmax(-1)
    entropy = -(logps.detach().exp() * logps.detach()).sum(-1)
    return logps.gather(1, targets[:, None]).squeeze(1), entropy


def last_token_states(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(rows, dim): the hidden state of each row's last real token (rows are right-padded; prompt
    tuning's virtual tokens, when present, come first)."""
    last = attention_mask.sum(dim=1) - 1 + states.size(1) - attention_mask.size(1)
    return states[torch.arange(states.size(0), device=states.device), last]
