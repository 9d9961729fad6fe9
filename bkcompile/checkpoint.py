"""Checkpoint and resume a private training run: model, DP optimizer, Poisson loader, in one atomic file.

A checkpoint holds the model's parameters and buffers, the wrapped optimizer's state, the accountant's
history, the adaptive clipping thresholds, where the loader stands in its epoch, and the states of the
sampling and noise generators. Resuming from it gives the same epsilon and, the generators being part
of it, the same continuation bit for bit as the run that was not interrupted. Take it after
``optimizer.step()`` (between steps), so that it holds whole steps: none lost, none counted twice.

The generator states are secret (whoever has them knows the coming batches and noise): a checkpoint is as
private as the training data. Publish ``model.state_dict()`` instead.

A model sharded with FSDP2's ``fully_shard`` is saved whole: every rank calls ``save_checkpoint`` (the
model's and the wrapped optimizer's full state dicts are gathered from the shards with
``torch.distributed.checkpoint.state_dict``), rank 0 writes the file, and every rank returns once it is
written; ``load_checkpoint`` on every rank loads the full state into its shards (any world size).
Under DDP the replicas are equal and rank 0 alone saves.

Writes are atomic: the checkpoint goes to a temporary file in the same directory, is flushed to disk,
and then renamed over ``path``; a crash during the save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from bkcompile.data import PoissonLoader
from bkcompile.errors import BKError
from bkcompile.optimizer import DPOptimizer
from bkcompile.runtime.distributed import is_fully_sharded

FORMAT = "bkcompile-checkpoint-1"


def _module(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # the module inside torch.compile's wrapper


def save_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, optimizer: DPOptimizer, loader: PoissonLoader, **extra
) -> None:
    """Write model, optimizer and loader state (and ``extra`` picklable values, e.g. the epoch) atomically.
    Under FSDP2 every rank calls it."""
    module = _module(model)
    state = {"format": FORMAT, "optimizer": optimizer.state_dict(), "loader": loader.state_dict(), "extra": extra}
    if is_fully_sharded(module):
        state["model"] = get_model_state_dict(module, options=_WHOLE)
        state["optimizer"]["optimizer"] = get_optimizer_state_dict(module, optimizer.optimizer, options=_WHOLE)
        if dist.get_rank() == 0:
            _write(state, Path(path))
        dist.barrier()  # the file is there when any rank returns
    else:
        state["model"] = module.state_dict()
        _write(state, Path(path))


_WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # FSDP2: gathered from the shards, on rank 0


def _write(state: dict, path: Path) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself reaches the disk
    finally:
        os.close(directory)


def load_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, optimizer: DPOptimizer, loader: PoissonLoader
) -> dict:
    """Restore model, optimizer and loader from ``path`` (made as for the saved run); returns the ``extra`` values."""
    state = torch.load(path, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BKError(f"{path} is not a bkcompile checkpoint (written by bkcompile.save_checkpoint)")
    module = _module(model)
    if is_fully_sharded(module):  # each rank loads its shards from the full state
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(module, state["model"], options=options)
        with optimizer.stepping_inner():  # it steps the wrapped optimizer once (zero gradients, lr 0) to make its state
            set_optimizer_state_dict(module, optimizer.optimizer, state["optimizer"]["optimizer"], options=options)
        state["optimizer"]["optimizer"] = optimizer.optimizer.state_dict()  # loaded: the rest goes as usual
    else:
        module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["loader"])
    return state["extra"]
