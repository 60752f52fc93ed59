"""A `stage: rm` run as a GRPO reward function: its value head scores each prompt + completion.

The reward model is loaded from its output_dir (base + adapter, value_head.safetensors; safetensors
only) and scores the text the policy saw and wrote, re-tokenized with the reward model's own tokenizer,
on the last token's hidden state, as `stage: rm` trained it. It runs without gradient, in micro-batches
of at most `batch_rows` rows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from r1tune.data.encode import Example
from r1tune.models.value_head import has_value_head, load_value_head
from r1tune.train import batching
from r1tune.train.rewards import text_of
from r1tune.train.sequence_scores import SequenceScorer, last_token_states


def is_reward_model_dir(spec: str) -> bool:
    return Path(spec).is_dir() and has_value_head(Path(spec))


class RewardModelFunc:
    """reward_funcs entry given as a reward model's output_dir."""

    def __init__(self, folder: str, batch_rows: int = 16):
        from r1tune.models.run_loading import load_run

        self.head = load_value_head(Path(folder))
        self.model, self.tokenizer = load_run(folder)
        self.model.eval().requires_grad_(False)
        self.scorer = SequenceScorer(self.model)
        self.batch_rows = batch_rows
        self.__name__ = f"rm:{Path(folder).name}"  # names its log keys (rewards/rm:NAME/mean)

    @torch.no_grad()
    def __call__(self, prompt_texts: list[str], completions: list, **_) -> list[float]:
        texts = [prompt + text_of(completion) for prompt, completion in zip(prompt_texts, completions)]
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        scores = []
        for start in range(0, len(ids), self.batch_rows):
            rows = [Example(row, row) for row in ids[start:start + self.batch_rows]]
            batch = batching.collate(rows, self.tokenizer.pad_token_id, "sdpa")
            states = self.scorer.last_hidden(batch)
            last = last_token_states(states, batch["attention_mask"])
            scores += self.head(last).squeeze(-1).float().tolist()
        return scores
