"""Resumable checkpoints, written atomically (r1tune.fileio: a temp folder renamed into place).

A checkpoint holds only what training changes: the trainable weights (safetensors),
the optimizer state (loaded back with weights_only=True, never a general unpickle),
the RNG state and a small JSON trainer state.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from r1tune.errors import UserError
from r1tune.fileio import atomic_folder
from r1tune.train.fsdp import is_sharded, load_full_state

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.safetensors"
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's own files (its pickle-based format): resume only from checkpoints you wrote
UNIVERSAL_DIR = "deepspeed_universal"  # the same converted for another number of processes (written at resume)


@dataclass
class TrainerState:
    global_step: int = 0
    best_eval_loss: float | None = None  # kept so checkpoints of earlier versions still load
    evals_without_improvement: int = 0
    watch: dict = field(default_factory=dict)  # TrainingWatch state: early stopping and lr plateau
    processes: int = 1  # how many processes wrote it (DeepSpeed checkpoints resume only under as many)


def trainable_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output_dir: Path, weights: dict[str, torch.Tensor] | None, optimizer_state: dict | Path,
                    state: TrainerState, limit: int | None) -> Path:
    """`weights`: the trainable weights by name (trainable_weights); `optimizer_state`: optimizer.state_dict()'s
    form, or the folder DeepSpeed wrote its partitioned states to (weights then None: they are in there)."""
    final = output_dir / f"checkpoint-{state.global_step}"
    with atomic_folder(final) as tmp:  # an interrupted save never leaves a checkpoint that resume would pick
        if isinstance(optimizer_state, Path):
            shutil.move(str(optimizer_state), str(tmp / DEEPSPEED_DIR))
        else:
            save_file(weights, str(tmp / WEIGHTS_FILE))
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / RNG_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    if limit:
        for old in list_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def param_names(model, optimizer) -> list[str]:
    """The names of the optimizer's parameters in its own order (the integer keys of its state_dict)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def by_index(named: dict, names: list[str]) -> dict:
    """A name-keyed optimizer state (torch.distributed.checkpoint's form) in optimizer.state_dict()'s form,
    so that a checkpoint is the same whichever way the run was split over processes."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in named["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]}


def by_name(indexed: dict, names: list[str]) -> dict:
    """by_index reversed."""
    return {"state": {names[i]: v for i, v in indexed["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in indexed["param_groups"]]}


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(spec: str, output_dir: Path) -> Path | None:
    """'auto' → newest checkpoint in output_dir (None when there is none); else the given folder."""
    if spec == "auto":
        found = list_checkpoints(output_dir) if output_dir.is_dir() else []
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"resume_from_checkpoint '{spec}' is not an r1tune checkpoint folder (no {STATE_FILE}); use 'auto' or a checkpoint-N folder")
    return path


def read_step(path: Path) -> int:
    """The global step a checkpoint was written at (0 when its state file is unreadable)."""
    try:
        return int(json.loads((path / STATE_FILE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def load_checkpoint(path: Path, model, optimizer, ds=None) -> TrainerState:
    """Restore a checkpoint into this run; UserError when it was written by a different setup. `ds`: DeepSpeed's
    engine when this run uses one (its checkpoints hold DeepSpeed's own partitioned files)."""
    hint = "resume with the config that wrote it, or start fresh without resume_from_checkpoint"
    if (path / DEEPSPEED_DIR).is_dir() or ds is not None:
        return _load_deepspeed(path, ds, hint)
    try:
        weights = load_file(str(path / WEIGHTS_FILE))
        optimizer_state = torch.load(path / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
        rng = load_file(str(path / RNG_FILE))
        state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"checkpoint '{path}' is incomplete or unreadable ({type(exc).__name__}); {hint}") from None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(weights):
        differ = sorted(set(params) ^ set(weights))[0]
        raise UserError(f"checkpoint '{path}' trains different weights than this run (e.g. '{differ}'); {hint}")
    wrong = [n for n, p in params.items() if p.shape != weights[n].shape]
    if wrong:
        raise UserError(f"checkpoint '{path}' has weight '{wrong[0]}' of another shape (lora_rank changed?); {hint}")
    try:
        if is_sharded(model):
            load_full_state(model, optimizer, weights, by_name(optimizer_state, param_names(model, optimizer)))
        else:
            with torch.no_grad():
                for name, tensor in weights.items():
                    params[name].copy_(tensor)
            optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, RuntimeError):
        raise UserError(f"checkpoint '{path}' has optimizer state for another setup; {hint}") from None
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def _load_deepspeed(path: Path, ds, hint: str) -> TrainerState:
    from r1tune.train.distributed import world_size

    try:
        state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
        rng = load_file(str(path / RNG_FILE))
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"checkpoint '{path}' is incomplete or unreadable ({type(exc).__name__}); {hint}") from None
    if ds is None or not (path / DEEPSPEED_DIR).is_dir():
        raise UserError(f"checkpoint '{path}' was written {'with' if ds is None else 'without'} DeepSpeed and this run "
                        f"is {'not' if ds is None else ''} using it; {hint}")
    tag = DEEPSPEED_DIR
    if state.processes != world_size() and ds.zero_optimization_stage() < 3:
        # converted by ds_to_universal, ZeRO-1/2 checkpoints of plain (non-Megatron) models loaded back with
        # the weights of the start of the run here (losses after resuming differed by 0.9)
        raise UserError(f"checkpoint '{path}' was written by DeepSpeed ZeRO-{ds.zero_optimization_stage()} with "
                        f"{state.processes} processes, whose states are partitioned per process; resume it with "
                        f"{state.processes} processes (a ZeRO-3 checkpoint can change the count)")
    if state.processes != world_size():  # partitioned for another count: through DeepSpeed's universal format
        tag = _universal_copy(path)
        ds._config.load_universal_checkpoint = True  # read by load_checkpoint only
    loaded, _ = ds.load_checkpoint(str(path), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    if loaded is None:
        raise UserError(f"checkpoint '{path}': DeepSpeed could not load its files; {hint}")
    torch.set_rng_state(rng["cpu"])
    return state


def _universal_copy(path: Path) -> str:
    """The checkpoint's DeepSpeed files converted by DeepSpeed's ds_to_universal (rank 0, once, beside them), which
    any number of processes can load; the folder's name (a load_checkpoint tag)."""
    import contextlib
    import io
    from argparse import Namespace

    from r1tune.process import rank
    from r1tune.train.distributed import barrier

    target = path / UNIVERSAL_DIR
    if rank() == 0 and not target.is_dir():
        from deepspeed.checkpoint.ds_to_universal import main as to_universal

        with atomic_folder(target) as tmp, contextlib.redirect_stdout(io.StringIO()):
            to_universal(Namespace(input_folder=str(path / DEEPSPEED_DIR), output_folder=str(tmp),
                                   num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                   inject_missing_state=True))
    barrier()
    return UNIVERSAL_DIR
