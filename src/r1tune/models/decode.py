"""Batched KV-cache decoding, shared by the server (r1tune.serve) and GRPO's rollouts (r1tune.train):
a running batch of rows, their KV cache and attention mask.

Rows are left-padded, so every row's newest token sits in the last column and one forward pass
of shape (rows, 1) advances them all. Positions are kept per row (padding does not count).
A finished row leaves the batch at once (its cache rows are dropped); new rows join between two
steps: they are prefilled on their own, then both caches are left-padded to one length and
stacked. Joining needs plain per-layer key/value tensors (transformers' DynamicLayer); caches of
another kind (sliding windows, say) run a batch to its end before the next one starts.
`complete` runs a fixed list of prompts through one such batch (rows join as others finish).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r1tune.models.lean_decode import lean_step
from r1tune.models.sampling import Params, pick_tokens


@dataclass
class Row:
    """One request inside the batch. `emit(token)` returns False once the request is done."""
    ids: list[int]
    params: Params
    emit: Callable[[int], bool]
    position: int = 0  # position id of the next token fed in
    generated: int = 0


def cache_keyword(model) -> str:
    """transformers 5 renamed `past_key_values` to `cache` (the old name still works, with a warning)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def new_cache(model):
    from transformers import DynamicCache

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return DynamicCache(config=config) if config is not None else DynamicCache()


def virtual_prompt(model):
    """The PEFT model when it adds virtual tokens (prompt / P-tuning), else None."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    return model if config is not None and config.is_prompt_learning else None


def joinable(cache) -> bool:
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


class Batch:
    def __init__(self, model, rows: list[Row], pad_id: int, device):
        self.pad_id, self.device = pad_id, device
        self.virtual = virtual_prompt(model)
        self.model = model.get_base_model() if self.virtual else model  # virtual tokens are fed in by hand
        self.keyword = cache_keyword(model)
        self.lean = lean_step(self.model)  # decode steps without transformers' per-call cost (None: not covered)
        self.rows, self.cache = [], new_cache(model)
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        self._prefill(rows)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache, embeds=None) -> torch.Tensor:
        inputs = {"inputs_embeds": embeds} if embeds is not None else {"input_ids": ids}
        out = self.model(**inputs, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.keyword: cache})
        return out.logits[:, -1, :]

    def _with_virtual_tokens(self, ids: torch.Tensor, mask: torch.Tensor):
        """Prompt / P-tuning: the trained virtual token embeddings go before each prompt (and its padding),
        and count as positions, as in training."""
        prompts = self.virtual.get_prompt(batch_size=ids.shape[0]).to(self.model.dtype)
        embeds = torch.cat([prompts, self.model.get_input_embeddings()(ids)], dim=1)
        return embeds, torch.cat([torch.ones(prompts.shape[:2], dtype=mask.dtype, device=mask.device), mask], dim=1)

    @torch.no_grad()
    def _prefill(self, rows: list[Row]) -> None:
        """Run the prompts of `rows` (left-padded) and add them to the batch with their first token."""
        width = max(len(r.ids) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r.ids)) + r.ids for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows], device=self.device)
        embeds = None
        if self.virtual:
            embeds, mask = self._with_virtual_tokens(ids, mask)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = new_cache(self.model) if self.rows else self.cache
        logits = self.forward(ids, mask, positions, cache, embeds)
        for r, seen in zip(rows, mask.sum(1).tolist()):
            r.position = seen
        if self.rows:
            self._stack(cache, mask)
        else:
            self.mask = mask
        self.rows += rows
        self._advance(rows, logits, first=len(self.rows) - len(rows))

    def join(self, rows: list[Row]) -> None:
        self._prefill(rows)

    def _stack(self, cache, mask: torch.Tensor) -> None:
        """Append another batch's cache and mask below this one's, left-padding the shorter."""
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, width), left_pad(theirs.keys, width)])
            mine.values = torch.cat([left_pad(mine.values, width), left_pad(theirs.values, width)])
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)), F.pad(mask, (width - mask.shape[1], 0))])

    @torch.no_grad()
    def step(self) -> None:
        """Feed every row its newest token and take the next one."""
        last = torch.tensor([[r.ids[-1]] for r in self.rows], device=self.device)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        positions = torch.tensor([[r.position] for r in self.rows], device=self.device)
        if self.lean is not None:
            logits = self.lean(last, self.mask, positions, self.cache)
        else:
            logits = self.forward(last, self.mask, positions, self.cache)
        for r in self.rows:
            r.position += 1
        self._advance(self.rows, logits, first=0)

    def _advance(self, rows: list[Row], logits: torch.Tensor, first: int) -> None:
        """Give `rows` (batch rows first.. onward) their next tokens; drop the rows that are done."""
        tokens = pick_tokens(logits, [r.params for r in rows])
        done = set()
        for i, (r, token) in enumerate(zip(rows, tokens)):
            r.ids.append(token)
            r.generated += 1
            if not r.emit(token):
                done.add(first + i)
        if done:
            self._keep([i for i in range(len(self.rows)) if i not in done])

    def _keep(self, indices: list[int]) -> None:
        self.rows = [self.rows[i] for i in indices]
        if not self.rows:
            return
        index = torch.tensor(indices, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns no row needs
        if unused and joinable(self.cache):
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]
            self.mask = self.mask[:, unused:]

    @property
    def can_join(self) -> bool:
        return joinable(self.cache)


def left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, T, D) padded with zeros before T up to `width` (masked, so never attended to)."""
    return F.pad(t, (0, 0, width - t.shape[-2], 0))


def eos_ids_of(model, tokenizer) -> set[int]:
    """Token ids that end a reply: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
    return ids


@dataclass
class Completion:
    ids: list[int]  # the generated tokens, the EOS that ended them included
    finished: bool  # ended with an EOS token (False: cut at max_tokens)


def complete(model, prompts: list[list[int]], params: list[Params], eos_ids: set[int], pad_id: int,
             max_rows: int = 64) -> list[Completion]:
    """Each prompt's completion under its own Params, through one running batch of at most `max_rows`
    rows: waiting prompts join whenever a quarter of the rows have finished (one prefill each time)."""
    device = next(model.parameters()).device
    results: list[Completion | None] = [None] * len(prompts)
    waiting = deque(range(len(prompts)))

    def row(i: int) -> Row:
        out = []

        def emit(token: int) -> bool:
            out.append(token)
            if token in eos_ids or len(out) >= params[i].max_tokens:
                results[i] = Completion(out, token in eos_ids)
                return False
            return True
        return Row(list(prompts[i]), params[i], emit)

    def take(n: int) -> list[Row]:
        return [row(waiting.popleft()) for _ in range(min(n, len(waiting)))]

    batch = None
    while waiting or (batch is not None and batch.rows):
        if batch is None or not batch.rows:
            batch = Batch(model, take(max_rows), pad_id, device)
            continue
        room = max_rows - len(batch.rows)
        if waiting and batch.can_join and room >= max(1, max_rows // 4):
            batch.join(take(room))
        if batch.rows:
            batch.step()
    return results
