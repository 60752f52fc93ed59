"""Cross-entropy over a large vocabulary without materialising the logits.

The plain loss computes (tokens x vocab) logits, keeps them (and their softmax) for the
backward pass: for DeepSeek's 129,280-token vocabulary at 4 x 1,024 tokens that is
several GB. Here only the positions that carry a label are scored, in chunks of rows;
each chunk's logits are turned into the loss *and* the gradients (softmax - one-hot)
right away and then freed, so the backward pass only scales the stored gradients.
Peak memory is one chunk of logits plus the gradients of the hidden states (and of the
output head, when it is trained).
"""

from __future__ import annotations

import torch
from torch import nn

from r1tune.data.encode import IGNORE

CHUNK_BYTES = 128 * 2**20  # fp32 logits per chunk
ROW_MULTIPLE = 64  # head matmuls see a few row counts per run, not one per batch
# Model types whose logits are exactly lm_head(last hidden state): no scaling, soft-capping or aux loss.
PLAIN_HEAD_MODELS = {"llama", "qwen2", "qwen3", "mistral", "deepseek_v3"}


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, grads: tuple[bool, bool], compute_dtype,
                smoothing: float = 0.0):
        want_hidden, want_weight = grads
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        w = weight.to(compute_dtype)
        for start in range(0, hidden.size(0), chunk_rows):
            h = _pad_rows(hidden[start:start + chunk_rows].to(compute_dtype))
            t = targets[start:start + chunk_rows]
            padded = (h @ w.T).float()  # the only (rows x vocab) buffer; its zero rows stay zero
            logits = padded[:t.numel()]  # everything below is in place on the real rows
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            if smoothing:  # (1-e)·CE + e·mean over the vocabulary of -log p, as torch's label_smoothing
                target_logit = (1 - smoothing) * target_logit + smoothing * logits.mean(dim=-1)
            top = logits.amax(dim=-1)
            total = logits.sub_(top[:, None]).exp_().sum(dim=-1)
            loss += (top + total.log() - target_logit).sum()
            if not (want_hidden or want_weight):
                continue
            probs = logits.div_(total[:, None])  # softmax
            if smoothing:
                probs.sub_(smoothing / probs.size(1))
            probs[torch.arange(t.numel(), device=t.device), t] -= 1.0 - smoothing  # d loss / d logits
            d = padded.to(compute_dtype)
            if want_hidden:
                grad_hidden[start:start + chunk_rows] = (d @ w)[:t.numel()].to(hidden.dtype)
            if want_weight:
                grad_weight.addmm_(d.T.to(torch.float32), h.to(torch.float32))
            del padded, logits, probs, d
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.grads, ctx.weight_dtype = grads, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = list(ctx.saved_tensors)  # our own buffers: scaled in place, no second copy
        grad_hidden = saved.pop(0).mul_(grad_loss) if ctx.grads[0] else None
        grad_weight = saved.pop(0).mul_(grad_loss).to(ctx.weight_dtype) if ctx.grads[1] else None
        return grad_hidden, grad_weight, None, None, None, None, None


def _pad_rows(rows: torch.Tensor) -> torch.Tensor:
    """rows with zero rows appended up to a multiple of ROW_MULTIPLE.

    The number of labelled positions differs in every batch; on CPU oneDNN keeps state for
    every bf16 matmul shape it meets (about 1 MB each), so unpadded the head's matmuls made
    RSS climb through a whole run (20M DeepSeek-V3 bench run: 1.00 -> 0.95 GB peak padded)."""
    extra = -rows.size(0) % ROW_MULTIPLE
    return torch.nn.functional.pad(rows, (0, 0, 0, extra)) if extra else rows


def rows_per_chunk(vocab: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows whose fp32 logits fit the budget, a multiple of ROW_MULTIPLE (128 MB: 256 rows for a
    129,280-token vocabulary)."""
    return max(ROW_MULTIPLE, min(4096, budget_bytes // (4 * vocab)) // ROW_MULTIPLE * ROW_MULTIPLE)


def chunked_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     chunk_rows: int | None = None, smoothing: float = 0.0) -> torch.Tensor:
    """Sum of next-token cross-entropy (fp32), same value and gradients as causal_lm_loss_sum(hidden @ weight.T).

    hidden: (batch, seq, dim) last hidden states; weight: (vocab, dim) output head; labels: (batch, seq).
    """
    mask = labels[:, 1:] != IGNORE
    rows = hidden[:, :-1][mask]  # only positions that predict a label are scored
    targets = labels[:, 1:][mask]
    compute_dtype = _compute_dtype(hidden)
    grads = (rows.requires_grad and torch.is_grad_enabled(), weight.requires_grad and torch.is_grad_enabled())
    chunk_rows = chunk_rows or rows_per_chunk(weight.size(0))
    loss = _ChunkedCrossEntropy.apply(rows, weight, targets, chunk_rows, grads, compute_dtype, smoothing)
    return loss


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def plain_head(model) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, output head) when the model's logits are exactly head(decoder(...)), else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = getattr(base, "model", None)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in PLAIN_HEAD_MODELS or decoder is None or type(head) is not nn.Linear or head.bias is not None:
        return None
    return decoder, head
