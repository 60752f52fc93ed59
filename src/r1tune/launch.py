"""`r1tune train` as several processes, with LLaMA-Factory's launch conventions, through torchrun's launcher.

    FORCE_TORCHRUN=1 NPROC_PER_NODE=2 r1tune train run.yaml                      # one node, 2 processes
    FORCE_TORCHRUN=1 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 r1tune train run.yaml

Several processes start when FORCE_TORCHRUN is set, when NPROC_PER_NODE or NNODES asks for more than
one, or when more than one GPU is visible (one process per GPU, as LLaMA-Factory does); a run started
by torchrun or accelerate launch is already one of several and is never launched again. The workers
are started by torch.distributed's elastic launcher (what torchrun runs): when one rank fails, the
launcher ends the others, and `r1tune train` ends with that rank's one-line error.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from r1tune.errors import UserError

ERROR_DIR = "R1TUNE_ERROR_DIR"  # where each worker writes its one-line error, for the launcher to report


@dataclass
class Plan:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int


def _int(env: dict, key: str, default: int) -> int:
    value = env.get(key, "")
    if value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise UserError(f"environment variable {key}={value!r} must be a whole number >= 0")
    return number


def plan_from_env(env: dict | None = None, gpus: int | None = None) -> Plan | None:
    """The processes to start for this `r1tune train`, or None to train in this process."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1") or 1) > 1 or "LOCAL_RANK" in env:  # already a torchrun / accelerate worker
        return None
    if gpus is None:
        gpus = _visible_gpus()
    nproc = _int(env, "NPROC_PER_NODE", max(gpus, 1))
    nnodes = _int(env, "NNODES", 1)
    forced = env.get("FORCE_TORCHRUN", "").lower() in ("1", "true", "yes")
    if not (forced or nproc > 1 or nnodes > 1):
        return None
    if nproc < 1 or nnodes < 1:
        raise UserError("NPROC_PER_NODE and NNODES must be at least 1")
    node_rank = _int(env, "NODE_RANK", 0)
    if node_rank >= nnodes:
        raise UserError(f"NODE_RANK={node_rank} must be below NNODES={nnodes}")
    if nnodes > 1 and not env.get("MASTER_ADDR"):
        raise UserError("NNODES > 1 needs MASTER_ADDR: the address of the node with NODE_RANK=0, the same on every node")
    port = _int(env, "MASTER_PORT", 0) or (free_port() if nnodes == 1 else 29500)
    return Plan(nproc, nnodes, node_rank, env.get("MASTER_ADDR") or "127.0.0.1", port)


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # a broken CUDA setup: train in this process, which reports it
        return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(plan: Plan, argv: list[str]) -> int:
    """Run `python -m r1tune <argv>` as plan's processes on this node; the job's exit code (2: a rank's
    user error, printed here once more as the job's last line)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its per-worker report: ours follows
    config = LaunchConfig(min_nodes=plan.nnodes, max_nodes=plan.nnodes, nproc_per_node=plan.nproc_per_node,
                          run_id="r1tune", rdzv_backend="static", rdzv_endpoint=f"{plan.master_addr}:{plan.master_port}",
                          rdzv_configs={"rank": plan.node_rank}, max_restarts=0, monitor_interval=0.2)
    threads = max(1, (os.cpu_count() or 1) // plan.nproc_per_node)
    with tempfile.TemporaryDirectory(prefix="r1tune-ranks-") as errors:
        os.environ[ERROR_DIR] = errors
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # the node's cores shared between its workers
        print(f"launching {plan.nproc_per_node * plan.nnodes} processes ({plan.nproc_per_node} per node x "
              f"{plan.nnodes} node{'s' if plan.nnodes > 1 else ''}; node rank {plan.node_rank}, master "
              f"{plan.master_addr}:{plan.master_port})", file=sys.stderr)
        try:
            elastic_launch(config, sys.executable)("-m", "r1tune", *argv)
        except ChildFailedError as exc:
            return _report(exc, Path(errors))
        finally:
            os.environ.pop(ERROR_DIR, None)
    return 0


def _report(exc, errors: Path) -> int:
    """The failing rank's own line (a rank that only lost its peers is reported when no other said more), else
    its exit code; 2 when that was a user error."""
    written = sorted(errors.glob("rank*.txt"), key=lambda p: (p.name.endswith(".lost.txt"), p.stat().st_mtime_ns))
    failures = exc.failures
    if written:
        first = written[0]
        rank = int(first.name.split(".")[0].removeprefix("rank"))
        print(f"r1tune: stopped, rank {rank} failed: {first.read_text(encoding='utf-8').strip()}", file=sys.stderr)
        code = failures[rank].exitcode if rank in failures else 1
        return 2 if code == 2 else 1
    rank, failure = min(failures.items(), key=lambda kv: kv[1].timestamp)
    print(f"r1tune: stopped, rank {rank} failed with exit code {failure.exitcode} (its output is above)", file=sys.stderr)
    return 1


def record_error(line: str, lost_peer: bool = False) -> bool:
    """In a worker r1tune's launcher started: leave this rank's one-line error for the launcher (True).
    `lost_peer`: the rank only noticed that another one had ended."""
    folder = os.environ.get(ERROR_DIR)
    if not folder:
        return False
    name = f"rank{os.environ.get('RANK', '0')}{'.lost' if lost_peer else ''}.txt"
    Path(folder, name).write_text(line + "\n", encoding="utf-8")
    return True
