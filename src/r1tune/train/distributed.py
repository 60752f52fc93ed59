"""Several training processes (torchrun / accelerate launch / `r1tune train` with NPROC_PER_NODE):
the process group, each rank's share of a step, and the sums that make N processes train as one.

Every rank holds the whole model and runs the same loop on a disjoint share of each optimizer step
(data parallelism, as torch's DDP). Each rank divides its summed loss by the units (target tokens,
pairs, completions) of the whole step over all ranks, so summing the ranks' gradients gives exactly
the gradient one process would compute on the whole step. The gradients are summed once per
optimizer step, after the last micro-batch, in flat buckets: ranks may cut their share into
different numbers of micro-batches (token budgets), and the stages score through the decoder and
the output head separately (chunked loss), which DDP's module wrapper would not see. With one
process every function here is a no-op.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch

from r1tune.process import rank

BUCKET_BYTES = 64 * 2**20  # gradients are summed in flat buckets of at most this size


def dist():
    import torch.distributed as d

    return d


def active() -> bool:
    d = dist()
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def world_size() -> int:
    return dist().get_world_size() if active() else 1


def launched() -> bool:
    """Started by torchrun / accelerate launch (or r1tune's launcher) as one of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def setup(timeout_s: int = 1800, backend: str | None = None, group_of_one: bool = False) -> torch.device | None:
    """Join the process group when launched as several processes (or, `group_of_one`, start a group of this
    one process: DeepSpeed needs one); the device this rank uses (None: no group). GPUs: one per local rank,
    NCCL; CPUs: gloo."""
    if not launched():
        if not group_of_one:
            return None
        from r1tune.launch import free_port

        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                           ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
    d = dist()
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not d.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        d.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return device


def lost_peer(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another rank of the job is gone (its own error says why)."""
    if not launched():
        return False
    d = dist()
    if isinstance(exc, getattr(d, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(
        sign in str(exc) for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def teardown() -> None:
    if active():
        dist().destroy_process_group()


def barrier() -> None:
    if active():
        dist().barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (building a tiny model, filling the data cache), then the others, which
    find its result on disk instead of writing the same files at the same time."""
    if rank() != 0:
        barrier()
    yield  # when rank 0 fails here, the launcher ends the waiting ranks
    if rank() == 0:
        barrier()


def share(items: list, part: int | None = None, parts: int | None = None) -> list:
    """This rank's share of `items`: every parts-th item from position `part` (disjoint, no gaps; in
    length-grouped order each rank gets rows of similar length)."""
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    return items[part::parts]


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sums over the ranks (float64)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist().all_reduce(t)
    return t.tolist()


def max_int(value: int) -> int:
    """The largest `value` over the ranks."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist().all_reduce(t, op=dist().ReduceOp.MAX)
    return int(t)


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable, produced by this code), in rank order."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist().all_gather_object(out, obj)
    return out


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over the ranks, in place. A parameter without a gradient on this rank
    (an expert no token of its share reached) takes part as zeros, and gets the sum."""
    if not active():
        return
    bucket, size = [], 0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        bucket.append(p)
        size += p.grad.numel() * p.grad.element_size()
        if size >= BUCKET_BYTES:
            _sum_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _sum_bucket(bucket)


def _sum_bucket(params: list[torch.nn.Parameter]) -> None:
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist().all_reduce(flat)
        at = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[at:at + n].view_as(p.grad))
            at += n


def broadcast_trainable(model: torch.nn.Module) -> None:
    """Every rank starts from rank 0's trainable weights (random adapter inits could differ by platform)."""
    if not active():
        return
    for p in model.parameters():
        if p.requires_grad:
            dist().broadcast(p.data, src=0)
