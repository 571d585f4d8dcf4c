"""A torch checkpoint in two halves: `capture` (in the step loop) and `write` (any thread, later).

`capture` takes everything a checkpoint holds while the training state cannot change under it:
the full model weights (gathered on rank 0 under FSDP), the optimizer, scheduler and scaler state,
and the RNG states. With `copy=True` (asynchronous saves) every tensor is copied to host memory,
so the next optimizer step may update the live tensors in place while `write` turns the copies
into files in a background thread; tensors that alias one another (tied weights) stay aliased
in the copy, so the files are the same as a synchronous save's. With `copy=False` (synchronous
saves) the snapshot holds references and `write` runs right away: no extra copy.

Under FSDP the optimizer state is written by every rank as its own shard with
torch.distributed.checkpoint; an asynchronous save hands it to `dcp.async_save` on a gloo group of
its own (`group`), which stages the shard to host memory here and writes it in dcp's thread.

The files and their names are those of state_io (transformers' layout); every write is wrapped in
checkpoint.writing(path), so a failed write names its file.
"""

from __future__ import annotations

import copy as copying
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ...checkpoint import writing
from . import state_io
from .distributed import unwrap


@dataclass
class Snapshot:
    """What one process writes into a checkpoint directory (see the module docstring)."""

    model: nn.Module  # the user's model: its save_pretrained / config writes the weights
    weights: dict[str, torch.Tensor] | None = None  # full weights, rank 0 only
    optimizer: dict | None = None  # optimizer.pt (rank 0, unsharded)
    scheduler: dict | None = None
    scaler: dict | None = None
    rng: dict | None = None
    rng_file: str = "rng_state.pth"
    shard_writer: Callable[[str], Any] | None = None  # FSDP optimizer shards: directory -> (a future or None)
    pending: list = field(default_factory=list)  # futures started by capture (async dcp)


def _host_copy(tree: Any, memo: dict) -> Any:
    """A copy of `tree` with every tensor copied to CPU; aliasing tensors stay aliased."""
    if isinstance(tree, torch.Tensor):
        t = tree.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.device)
        if key not in memo:
            memo[key] = t.to("cpu", copy=True)
        return memo[key]
    if isinstance(tree, dict):
        return {k: _host_copy(v, memo) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_host_copy(v, memo) for v in tree)
    return copying.deepcopy(tree)


def host_copy(tree: Any) -> Any:
    """`tree` with every tensor copied to host memory; tensors that alias one another stay aliased."""
    return _host_copy(tree, {})


def capture(model: nn.Module, state, info, *, save_only_model: bool = False, copy: bool = False, group=None,
            include_weights: bool = True) -> Snapshot:
    """Takes this process's part of a checkpoint (collective under FSDP: every process calls it).

    Args:
        model: the user's (unwrapped) model.
        state: the backend's TorchState (unused with save_only_model).
        info: the DistInfo of this process.
        save_only_model: weights only (TrainingArguments.save_only_model).
        copy: copy every tensor to host memory (for a write that happens later).
        group: under FSDP with copy=True, the gloo process group for dcp.async_save.
        include_weights: False for the training state alone.
    """
    memo: dict = {}
    keep = (lambda tree: _host_copy(tree, memo)) if copy else (lambda tree: tree)
    snapshot = Snapshot(model=model)
    if include_weights:
        weights = state_io._full_state_dict(model, info)
        if info.writes_checkpoints:  # under FSDP the gathered weights are host copies already
            snapshot.weights = weights if info.sharded else keep(weights)
    if save_only_model:
        return snapshot
    if info.sharded:
        snapshot.shard_writer = _shard_writer(state, copy, group)
    elif info.writes_checkpoints:
        snapshot.optimizer = keep(state.optimizer.state_dict())
    if info.writes_checkpoints:
        snapshot.scheduler = copying.deepcopy(state.scheduler.state_dict()) if copy else state.scheduler.state_dict()
        if state.scaler is not None:
            snapshot.scaler = keep(state.scaler.state_dict())
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.random.get_rng_state_all() if info.world_size > 1 else torch.cuda.random.get_rng_state()
    snapshot.rng = rng
    snapshot.rng_file = os.path.basename(state_io._rng_file("", info))
    return snapshot


def _shard_writer(state, copy: bool, group) -> Callable[[str], Any]:
    """FSDP: writes this rank's optimizer shard (collective). With copy=True, dcp.async_save copies
    the shard to host memory when called (in `start`) and writes it in dcp's own thread."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    optim_state = {"optimizer": get_optimizer_state_dict(unwrap(state.model), state.optimizer)}
    if not copy:
        return lambda directory: dcp.save(optim_state, checkpoint_id=os.path.join(directory, state_io.OPTIMIZER_SHARDS_DIR))
    return lambda directory: dcp.async_save(
        optim_state, checkpoint_id=os.path.join(directory, state_io.OPTIMIZER_SHARDS_DIR), process_group=group
    )


def start(snapshot: Snapshot, directory: str) -> None:
    """The part of the write that must run in the step loop, before the state changes: under FSDP
    the (collective) optimizer-shard save, or dcp.async_save's staging of it."""
    if snapshot.shard_writer is not None:
        os.makedirs(directory, exist_ok=True)
        with writing(os.path.join(directory, state_io.OPTIMIZER_SHARDS_DIR)):
            result = snapshot.shard_writer(directory)
        snapshot.shard_writer = None
        if hasattr(result, "result"):
            snapshot.pending.append(result)


def write(snapshot: Snapshot, directory: str) -> None:
    """Writes the snapshot's files into `directory` (the checkpoint's temporary directory)."""
    start(snapshot, directory)
    os.makedirs(directory, exist_ok=True)
    if snapshot.weights is not None:
        write_weights(snapshot.model, snapshot.weights, directory)
    for name, value in (("optimizer.pt", snapshot.optimizer), ("scheduler.pt", snapshot.scheduler),
                        ("scaler.pt", snapshot.scaler), (snapshot.rng_file, snapshot.rng)):
        if value is not None:
            path = os.path.join(directory, name)
            with writing(path):
                torch.save(value, path)
    for future in snapshot.pending:
        with writing(os.path.join(directory, state_io.OPTIMIZER_SHARDS_DIR)):
            future.result()
    snapshot.pending.clear()


def write_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], directory: str) -> None:
    """The model as its library loads it: save_pretrained for HF models, else model.safetensors."""
    os.makedirs(directory, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        with writing(os.path.join(directory, state_io.WEIGHTS_NAME)):
            model.save_pretrained(directory, state_dict=state_dict)
        return
    from safetensors.torch import save_file

    path = os.path.join(directory, state_io.WEIGHTS_NAME)
    with writing(path):
        save_file(state_io._dedupe_shared(state_dict), path, metadata={"format": "pt"})
