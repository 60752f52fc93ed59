"""Next-token choice for each row of a batch under its own request's settings.

Greedy rows take the argmax together; sampled rows draw from their own seeded generator, so a
request with a seed gets the same tokens whichever requests share its batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass
class Params:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self):
        seed = self.seed if self.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` (V,) with everything outside the smallest set of mass >= top_p zeroed."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    outside = sorted_p.cumsum(0) - sorted_p >= top_p  # the most likely token always stays
    return probs.scatter(0, order[outside], 0.0)


def pick_tokens(logits: torch.Tensor, params: list[Params]) -> list[int]:
    """One token id per row of `logits` (B, V)."""
    chosen = logits.argmax(-1).tolist()
    for i, p in enumerate(params):
        if p.temperature > 0:
            probs = nucleus(torch.softmax(logits[i].float().cpu() / p.temperature, -1), p.top_p)
            chosen[i] = int(torch.multinomial(probs, 1, generator=p.generator))
    return chosen
