"""Token-level cross-entropy for causal LMs, summed so callers can normalise per step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from r1tune.data.encode import IGNORE


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Sum of next-token cross-entropy over labelled positions (fp32), optionally label-smoothed.

    Logits may carry extra leading positions (prompt tuning's virtual tokens): only the
    last labels.size(1) positions are scored."""
    logits = logits[:, logits.size(1) - labels.size(1):]
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum", label_smoothing=smoothing)
