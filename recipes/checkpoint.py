"""Checkpoints of ``recipes/pretrain.py``: atomic save and resume (reloading one as a model and the dense
export: ``recipes/export.py``).

``checkpoints/step_<N>/`` holds ``model.safetensors`` (the parametrized model's state_dict, gathered to
rank 0 under FSDP, with the run's flags and model config in its metadata), ``tokenizer/`` and one
``state_rank<r>.pt`` per rank (step, flags, world size, optimizer, scheduler, RNG states, the data
stream's position), loadable with ``torch.load(..., weights_only=True)``. A checkpoint is written under a
temporary name, fsynced and ``os.replace``d into place, so a ``step_*`` directory is whole by construction.

Resuming is two explicit steps around the optimizer's construction (the weights must be in place
before the optimizer is built over them):

    saved = read_training_state(path, args, rank, world)   # checks the settings match; nothing loaded yet
    load_weights(raw_model, path, args)
    ...build the optimizer, the scheduler, the Run...
    restore_training_state(run, saved, path)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from recipes.flags import MAY_CHANGE, MUST_MATCH, RecipeError

if TYPE_CHECKING:
    from recipes.pretrain import Run


class WriteFailed(RuntimeError):
    """A file of the run could not be written (disk full, no permission): the run stops with an error line."""


def write_failure(error: BaseException, where) -> str:
    """What stopped a write, in the system's words ("No space left on device") where it said any: the
    ``OSError`` is looked for along the exception's chain, since torch.save reports a failed write as a
    ``RuntimeError`` about stream positions with the ``OSError`` as its context."""
    cause = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and cause.strerror:
        reason = cause.strerror
    elif "No space left on device" in str(error):  # safetensors' Rust error carries the OS message
        reason = "No space left on device"
    else:
        reason = _reason(error)
    return f"could not write {where}: {reason}"


def barrier(run: Run) -> None:
    if run.world > 1:
        dist.barrier()


# ---- saving ----------------------------------------------------------------------------------------
def full_state_dict(run: Run) -> dict | None:
    """The parametrized model's whole state_dict on CPU (rank 0; None elsewhere). Collective under FSDP."""
    if run.args.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(run.raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return weights if run.rank == 0 else None
    return {k: v.detach().cpu() for k, v in run.raw.state_dict().items()} if run.rank == 0 else None


def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np_state,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(saved: dict) -> None:
    torch.set_rng_state(saved["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in saved["python"]))
    np_state = dict(saved["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.array(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def plain_optimizer_state(value, to_plain: bool):
    """GaLore keeps a projector object in its state, which weights_only loads refuse: store its fields."""
    if isinstance(value, dict):
        if not to_plain and "galore_projector" in value:
            from galore_torch.galore_projector import GaLoreProjector

            projector = GaLoreProjector.__new__(GaLoreProjector)
            projector.__dict__.update(value["galore_projector"])
            return projector
        return {k: plain_optimizer_state(v, to_plain) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_optimizer_state(v, to_plain) for v in value]
    if to_plain and type(value).__name__ == "GaLoreProjector":
        return {"galore_projector": dict(vars(value))}
    return value


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run: Run) -> None:
    """Write checkpoints/step_N atomically: a temporary directory, fsynced, then os.replace. A write that
    fails (a full disk) removes the temporary directory and raises :class:`WriteFailed` on every rank."""
    args, rank, step = run.args, run.rank, run.step
    root = Path(args.out) / "checkpoints"
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    if final.exists() and damage(final) is None:  # whole when renamed into place; damaged later only by hand or disk
        return
    if rank == 0:
        for leftover in (*root.glob(".tmp-step_*"), *root.glob(".trash-step_*")):  # of runs killed mid-write
            shutil.rmtree(leftover, ignore_errors=True)
        if final.exists():  # damaged since (resume passed over it): replaced by this step's checkpoint
            os.replace(final, root / f".trash-{final.name}")
            shutil.rmtree(root / f".trash-{final.name}", ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(run)
    weights = full_state_dict(run)
    optimizer = run.optimizer.state_dict()
    _refuse_non_finite(run, weights, optimizer, root)
    failed = None
    try:
        _write_files(run, tmp, weights, optimizer)
    except Exception as error:  # noqa: BLE001  (disk full, permissions: every rank must agree before stopping)
        failed = error
    _stop_if_any_rank_failed(run, failed, tmp, root)
    barrier(run)
    if rank == 0:
        for file in (f for f in tmp.rglob("*") if f.is_file()):
            _fsync(file)
        os.replace(tmp, final)
        _fsync(root)
        for old in sorted(root.glob("step_*"))[: -args.keep]:  # renamed first: never a half-deleted step_*
            trash = root / f".trash-{old.name}"
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
    barrier(run)


def _write_files(run: Run, tmp: Path, weights: dict | None, optimizer: dict) -> None:
    from safetensors.torch import save_file

    args, rank, step = run.args, run.rank, run.step
    if rank == 0:
        metadata = {"step": str(step), "args": json.dumps(vars(args)), "config": run.config.to_json_string()}
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"), metadata=metadata)
        run.data.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    sharded = args.parallel == "fsdp"
    optimizer = plain_optimizer_state(optimizer, True) if (sharded or rank == 0) else None
    with open(tmp / f"state_rank{rank}.pt", "wb") as f:  # a Python file: a failed write keeps its OSError
        torch.save({"step": step, "args": vars(args), "world_size": run.world, "optimizer": optimizer,
                    "scheduler": run.scheduler.state_dict(), "rng": rng_state(),
                    "data": run.data.train.state_dict()}, f)


def _stop_if_any_rank_failed(run: Run, failed: Exception | None, tmp: Path, root: Path) -> None:
    """A checkpoint some rank could not write is removed whole, and the run stops on every rank."""
    bad = torch.tensor(float(failed is not None), device=run.device)  # on the device: NCCL reduces CUDA tensors
    if run.world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if not bad.item():
        return
    if run.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    good = sorted(root.glob("step_*"))
    what = write_failure(failed, f"the checkpoint of step {run.step} in {root}") if failed else \
        f"another rank could not write the checkpoint of step {run.step}"
    where = f"the newest complete checkpoint is {good[-1]}" if good else "no checkpoint was written before"
    raise WriteFailed(f"{what}. Nothing was saved for this step and {where}; make room (or choose another "
                      f"--out) and run again with --resume auto")


def _refuse_non_finite(run: Run, weights: dict | None, optimizer: dict, root: Path) -> None:
    """Never write a checkpoint of non-finite weights or optimizer states: stop the run instead, leaving the
    last good checkpoint the newest, and say how to go on from it. All ranks agree before anyone raises."""
    from torch.utils._pytree import tree_leaves

    tensors = [t for t in tree_leaves([weights or {}, optimizer]) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    bad = torch.tensor(float(any(not bool(torch.isfinite(t).all()) for t in tensors)), device=run.device)
    if run.world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        if run.rank == 0:
            shutil.rmtree(root / f".tmp-step_{run.step:08d}", ignore_errors=True)
        raise FloatingPointError(non_finite_message(run, "the weights or optimizer states are not finite", run.step))


def non_finite_message(run: Run, what: str, step: int) -> str:
    """What happened at this step and how to resume from the newest good checkpoint with other settings."""
    good = sorted((Path(run.args.out) / "checkpoints").glob("step_*"))
    where = (f"The newest good checkpoint is {good[-1]}: resume from it with other settings, e.g. "
             f"--resume {good[-1]} --lr {run.args.lr / 10:g} (--lr, --weight-decay, --clip-norm, --warmup and "
             f"--min-lr-ratio take effect on resume)" if good else
             "No checkpoint was written before; start again with a lower --lr or --clip-norm")
    return f"stopped at step {step}: {what}; nothing was saved for this step. {where}."


# ---- resuming --------------------------------------------------------------------------------------
def find_checkpoint(args) -> Path | None:
    """The checkpoint --resume names: 'auto' gives the newest intact one in --out (or None when there is
    none), passing over damaged ones (a truncated or missing file) with a note on stderr."""
    if args.resume is None:
        return None
    if args.resume != "auto":
        return Path(args.resume)
    found = sorted((Path(args.out) / "checkpoints").glob("step_*"), reverse=True)
    for path in found:
        problem = damage(path)
        if problem is None:
            return path
        print(f"note: checkpoint {path} is damaged ({problem}); trying the one before it", file=sys.stderr)
    if found:
        raise RecipeError(f"every checkpoint in {str(Path(args.out) / 'checkpoints')!r} is damaged (see the notes "
                          f"above); start afresh in another --out, or name one with --resume PATH")
    return None


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint directory's files, or None when each is whole: the safetensors header
    must cover the file, and each state file's zip directory must read (both fail on a truncated or empty
    file, without loading any tensor)."""
    from safetensors import safe_open

    weights = path / "model.safetensors"
    states = sorted(path.glob("state_rank*.pt"))
    if not weights.is_file():
        return "no model.safetensors"
    if not states:
        return "no state_rank*.pt"
    for file in (weights, *states):
        try:
            if file == weights:
                with safe_open(str(file), "pt"):
                    pass
            else:
                zipfile.ZipFile(file).close()  # torch.save writes a zip archive
        except Exception as error:  # truncated, empty or foreign: any reader error means "not intact"
            return f"{file.name}: {_reason(error)}"
    return None


def _reason(error: Exception) -> str:
    """An exception's first line, without PyTorch's advice to load with weights_only=False (it would run
    whatever pickle the file holds)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}" if first and "weights_only" not in first else type(error).__name__


def read_training_state(path: Path, args, rank: int, world: int) -> dict:
    """This rank's ``state_rank<r>.pt`` of ``path``, after checking it was made with the settings that
    must match (``flags.MUST_MATCH``) and the same world size; raises RecipeError naming the differences."""
    file = path / f"state_rank{rank}.pt"
    if not file.is_file():
        written = sorted(p.name for p in path.glob("state_rank*.pt"))
        raise RecipeError(f"checkpoint {str(path)!r} has no {file.name} (it holds {', '.join(written) or 'no state files'}): "
                          f"it was written by another number of processes, or is not a recipes/pretrain.py checkpoint")
    sharded = args.parallel == "fsdp"  # a rank's own shard returns to its own device; the rest to CPU first
    try:
        saved = torch.load(file, weights_only=True, map_location=None if sharded else "cpu")
    except Exception as error:  # an unreadable or foreign file: say which, not a pickle traceback
        raise RecipeError(f"checkpoint {str(path)!r}: cannot read {file.name} ({_reason(error)})") from None
    missing = [k for k in ("step", "args", "world_size", "optimizer", "scheduler", "rng", "data") if k not in saved]
    if missing:
        raise RecipeError(f"checkpoint {str(path)!r}: {file.name} lacks {missing}; it was not written by recipes/pretrain.py")
    different = {k: (saved["args"].get(k), getattr(args, k)) for k in MUST_MATCH if saved["args"].get(k) != getattr(args, k)}
    if saved["world_size"] != world:
        different["world_size"] = (saved["world_size"], world)
    if different:
        listed = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in different.items())
        raise RecipeError(f"checkpoint {str(path)!r} was made with other settings ({listed})")
    return saved


def load_weights(raw: torch.nn.Module, path: Path, args) -> None:
    """The checkpoint's weights into the (parametrized, possibly FSDP-sharded) model."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"))
    if args.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(raw, weights, options=StateDictOptions(full_state_dict=True))
    else:
        raw.load_state_dict(weights)


def restore_training_state(run: Run, saved: dict, path: Path) -> dict:
    """Optimizer, scheduler, data position, RNG states and step from ``saved`` (:func:`read_training_state`).

    The flags that may change on resume take effect: the learning rate and weight decay of this run (the
    optimizer's saved groups would otherwise win), and the schedule's warmup and floor, clipping and the
    eval/save cadence, which are read from the flags anyway. Returns ``{flag: [saved, now]}`` of what
    changed.
    """
    fresh = [(group["initial_lr"], group["weight_decay"]) for group in run.optimizer.param_groups]
    optimizer = saved["optimizer"]
    if optimizer is None:  # not sharded: rank 0's file holds it
        optimizer = torch.load(path / "state_rank0.pt", weights_only=True, map_location="cpu")["optimizer"]
    try:
        run.optimizer.load_state_dict(plain_optimizer_state(optimizer, False))
    except ValueError as error:
        raise RecipeError(
            f"checkpoint {str(path)!r}: its optimizer state does not fit this run's optimizer ({error}). Switching "
            f"--linear-lr-scale between 1 and another value changes the optimizer's parameter groups: resume with "
            f"--linear-lr-scale {saved['args'].get('linear_lr_scale', 1.0):g}"
        ) from None
    run.scheduler.load_state_dict(saved["scheduler"])
    step = run.scheduler.last_epoch
    for i, (group, (lr, weight_decay)) in enumerate(zip(run.optimizer.param_groups, fresh)):
        group.update(initial_lr=lr, weight_decay=weight_decay)
        group["lr"] = lr * run.scheduler.lr_lambdas[i](step)
    run.scheduler.base_lrs = [lr for lr, _ in fresh]
    run.data.train.load_state_dict(saved["data"])
    set_rng_state(saved["rng"])
    run.step = saved["step"]
    changed = {k: [saved["args"].get(k), getattr(run.args, k)] for k in MAY_CHANGE
               if k in saved["args"] and saved["args"][k] != getattr(run.args, k)}
    if run.rank == 0:
        note = "; ".join(f"--{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in changed.items())
        print(f"resumed from {path} at step {saved['step']}{f' ({note})' if note else ''}")
    return changed
