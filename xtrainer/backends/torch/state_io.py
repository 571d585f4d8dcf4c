"""Torch model / optimizer / scheduler / RNG files in transformers' checkpoint layout.

File names and contents match what transformers' Trainer writes (model.safetensors, config.json,
optimizer.pt, scheduler.pt, scaler.pt, rng_state[_N].pth), so checkpoints move both ways.
Everything is read with `weights_only=True` (plus numpy's RNG-state types on an allow-list): loading
a checkpoint never runs pickled code. A file the safe loader refuses (it pickles other objects)
raises `UnsafeCheckpointError` naming the file, unless the caller passes `allow_unsafe=True`
(TrainingArguments.allow_unsafe_checkpoint_load), which unpickles it fully.

Distributed runs: rank 0 writes every replicated file (model, optimizer.pt under DDP, scheduler,
scaler) and each rank its own rng_state_{rank}.pth. Under FSDP2 the model is gathered into full
weights for rank 0 to write (so a checkpoint's model.safetensors loads anywhere), while the
optimizer state, the big sharded part, is written by every rank as its own shard with
torch.distributed.checkpoint into `optimizer_shards/`. That directory can be read back by any
number of processes, sharded or not; an optimizer.pt (one process, DDP, or transformers) can be
read back under FSDP2 too.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .distributed import broadcast_object, unwrap

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
OPTIMIZER_NAME = "optimizer.pt"
OPTIMIZER_SHARDS_DIR = "optimizer_shards"


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that refer to one parameter object (tied weights), one list per parameter tied more than once."""
    by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append(name)
    return [names for names in by_param.values() if len(names) > 1]


def _full_state_dict(model: nn.Module, info) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict; under FSDP only rank 0 gets it (others: {}).

    Collective under FSDP: every process must call it.
    """
    if not info.sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload: gathered to rank 0's CPU one tensor at a time, never whole on an accelerator.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # The gathered copies of a tied parameter are separate tensors; make them alias again so that
    # save_pretrained / _dedupe_shared drop the tied names exactly as for an unsharded model.
    for names in _tied_groups(model):
        present = [n for n in names if n in state]
        for name in present[1:]:
            state[name] = state[present[0]]
    return state


def _dedupe_shared(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keeps one name per shared storage (tied weights): safetensors refuses aliasing tensors."""
    seen, out = set(), {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def gather_model_state(model: nn.Module, info) -> dict[str, torch.Tensor] | None:
    """The full weights to write, gathered to rank 0 under FSDP (collective: every process calls it);
    None when the model's own state_dict() is complete (no sharding)."""
    return _full_state_dict(model, info) if info.sharded else None


def write_model_weights(model: nn.Module, directory: str, state_dict: dict | None = None) -> None:
    """Writes the model as its library loads it: save_pretrained for HF models, else model.safetensors.

    Args:
        state_dict: full weights (from gather_model_state); None writes model.state_dict().
    """
    from . import save_snapshot

    if state_dict is None:
        state_dict = model.state_dict()
    save_snapshot.write_weights(model, state_dict, directory)


def save_model_weights(model: nn.Module, directory: str, info) -> None:
    """Gathers (under FSDP every process must call it) and writes the full weights on rank 0 (with
    save_on_each_node: on the first process of each node)."""
    state_dict = gather_model_state(model, info)
    if info.writes_checkpoints:
        write_model_weights(model, directory, state_dict)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds pickled objects that `torch.load(weights_only=True)` refuses to build."""

    def __init__(self, message: str, *, path: str):
        super().__init__(message)
        self.path = path


def read_weights(directory: str, *, allow_unsafe: bool = False) -> dict[str, torch.Tensor]:
    """Reads model weights from a checkpoint directory (single or sharded safetensors, or legacy .bin).

    Args:
        allow_unsafe: unpickle a legacy pytorch_model.bin fully when the safe loader refuses it.
    """
    from safetensors.torch import load_file

    single = os.path.join(directory, WEIGHTS_NAME)
    index = os.path.join(directory, WEIGHTS_INDEX_NAME)
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    try:
        if os.path.isfile(single):
            return load_file(single)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(os.path.join(directory, shard)))
            return state
        if os.path.isfile(legacy):
            return _load(legacy, allow_unsafe=allow_unsafe)
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # a truncated or corrupt file: say which one
        raise ValueError(f"Cannot read the model weights in {directory}: {exc}") from exc
    raise FileNotFoundError(
        f"No model weights in {directory}: expected {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or {LEGACY_WEIGHTS_NAME}."
    )


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that alias another parameter (saved once, restored by the tie)."""
    names = {name for group in _tied_groups(model) for name in group}
    # Plain tensors may also share storage without being one Parameter object; FSDP's DTensor
    # shards are covered by the identity groups above.
    by_storage: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not hasattr(tensor, "full_tensor"):
            by_storage.setdefault(tensor.data_ptr(), []).append(name)
    return names | {n for group in by_storage.values() if len(group) > 1 for n in group}


def _mismatch(model: nn.Module, state_dict: dict[str, torch.Tensor], directory: str) -> str | None:
    """Why `state_dict` cannot be loaded into `model`, or None when it fits.

    Shapes are compared with the model's global shapes, so sharded (DTensor) models are checked
    like plain ones.
    """
    own = model.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(k for k in state_dict if k in own and tuple(own[k].shape) != tuple(state_dict[k].shape))
    missing = sorted(set(own) - set(state_dict) - _tied_names(model))
    if not (unexpected or mismatched or missing):
        return None
    detail = "; ".join(
        f"{label}: {names[:5]}{' ...' if len(names) > 5 else ''}"
        for label, names in (("unexpected", unexpected), ("shape mismatch", mismatched), ("missing", missing))
        if names
    )
    return (
        f"The checkpoint {directory} does not match {type(model).__name__} ({detail}). "
        "Was it written for a different model or config?"
    )


def _loads_its_own_way(model: nn.Module) -> bool:
    return getattr(type(model), "load_state_dict", None) is not nn.Module.load_state_dict


def _report_incompatible_keys(result, directory: str) -> None:
    missing = list(getattr(result, "missing_keys", []) or [])
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if missing or unexpected:
        logger.warning(
            "Loading %s with the model's own load_state_dict left missing keys %s and unexpected keys %s.",
            directory, missing[:5], unexpected[:5],
        )


def load_model_weights(model: nn.Module, directory: str, info, *, allow_unsafe: bool = False) -> None:
    """Loads weights into the model, with a clear error when they belong to another model.

    `allow_unsafe` lets a legacy pytorch_model.bin be unpickled fully (see read_weights).

    Under FSDP only rank 0 reads the file; its tensors are broadcast and each process keeps its
    shard. Rank 0's verdict on the file is shared first, so a bad checkpoint raises the same error
    on every process instead of leaving the others waiting in the broadcast.
    """
    if not info.sharded:
        state_dict = read_weights(directory, allow_unsafe=allow_unsafe)
        if _loads_its_own_way(model):
            # A model class with its own load_state_dict (a buffer that grows, renamed keys) decides
            # what fits, as transformers lets it; what it leaves out is still reported.
            result = model.load_state_dict(state_dict, False)
            _report_incompatible_keys(result, directory)
            return
        problem = _mismatch(model, state_dict, directory)
        if problem:
            raise ValueError(problem)
        model.load_state_dict(state_dict, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state_dict, problem = {}, None
    if info.is_main:
        try:
            state_dict = read_weights(directory, allow_unsafe=allow_unsafe)
            problem = _mismatch(model, state_dict, directory)
        except (OSError, ValueError) as exc:
            problem = str(exc)
    problem = broadcast_object(problem, info)
    if problem:
        raise ValueError(problem)
    # strict=False: tied names are absent from the file (checked above) and come back with the tie.
    set_model_state_dict(
        model, state_dict, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    )


def _rng_file(directory: str, info) -> str:
    name = "rng_state.pth" if info.world_size <= 1 else f"rng_state_{info.rank}.pth"
    return os.path.join(directory, name)


def save_training_state(state, directory: str, info) -> None:
    """optimizer.pt (rank 0) or optimizer_shards/ (one shard per rank under FSDP), scheduler.pt, scaler.pt, RNG.

    Under FSDP every process must call it: the shards are written collectively.
    """
    from . import save_snapshot

    save_snapshot.write(save_snapshot.capture(unwrap(state.model), state, info, include_weights=False), directory)


def _load(path: str, device=None, *, allow_unsafe: bool = False):
    """torch.load with weights_only=True; a refused file raises UnsafeCheckpointError unless allow_unsafe.

    A corrupt or truncated file raises ValueError naming it. With allow_unsafe the file is
    unpickled fully (weights_only=False), which runs whatever code the pickle holds: only for
    checkpoints the user trusts, and logged as a warning.
    """
    location = device or "cpu"
    try:
        with _numpy_safe_globals():
            return torch.load(path, map_location=location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise ValueError(f"Cannot read {path} (truncated or corrupt?): {exc}") from exc
        if not allow_unsafe:
            first_line = str(exc).strip().splitlines()[0]
            raise UnsafeCheckpointError(
                f"Refusing to unpickle {path}: it holds objects other than tensors and plain containers, and "
                "unpickling them could run arbitrary code stored in the file. If you trust this checkpoint, set "
                f"TrainingArguments(allow_unsafe_checkpoint_load=True). (torch said: {first_line})",
                path=path,
            ) from exc
    except Exception as exc:
        raise ValueError(f"Cannot read {path} (truncated or corrupt?): {exc}") from exc
    logger.warning("Unpickling %s with weights_only=False (allow_unsafe_checkpoint_load=True).", path)
    try:
        return torch.load(path, map_location=location, weights_only=False)
    except Exception as exc:
        raise ValueError(f"Cannot read {path} (truncated or corrupt?): {exc}") from exc


def _numpy_safe_globals():
    """Allows numpy's RNG state (an ndarray in a tuple) through weights_only loading."""
    allowed = [np.ndarray, np.dtype, np.dtypes.UInt32DType] if hasattr(np, "dtypes") else [np.ndarray, np.dtype]
    try:
        allowed.append(np._core.multiarray._reconstruct)
    except AttributeError:
        allowed.append(np.core.multiarray._reconstruct)
    return torch.serialization.safe_globals(allowed)


def _load_sharded_optimizer(state, shards: str, info) -> None:
    """Reads optimizer_shards/ into the optimizer, whatever the number of processes that wrote it.

    The optimizer's own state dict (sharded DTensors under FSDP, full tensors otherwise) is the
    template that torch.distributed.checkpoint fills in, resharding as needed.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = unwrap(state.model)
    # get_optimizer_state_dict first creates the lazily built state (Adam moments) with a zero-lr
    # step, so the template has a slot for every tensor in the files.
    holder = {"optimizer": get_optimizer_state_dict(model, state.optimizer)}
    single = not (info.world_size > 1 and dist.is_initialized())
    with warnings.catch_warnings():
        # One process reading shards is intended here; dcp warns about it anyway.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(holder, checkpoint_id=shards, no_dist=single)
    set_optimizer_state_dict(model, state.optimizer, holder["optimizer"])


def _load_full_optimizer_sharded(state, path: str, allow_unsafe: bool = False) -> None:
    """Reads a full optimizer.pt (one process, DDP or transformers) into an FSDP-sharded optimizer.

    optimizer.pt names parameters by their position in the param groups; the distributed
    state-dict API names them by parameter name, so positions are translated through this
    optimizer's groups, which are built in the same order.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    model = unwrap(state.model)
    saved = _load(path, allow_unsafe=allow_unsafe)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = state.optimizer.param_groups
    if len(saved["param_groups"]) != len(groups) or any(
        len(s["params"]) != len(g["params"]) for s, g in zip(saved["param_groups"], groups)
    ):
        raise ValueError(f"{path} was written for other parameter groups than this optimizer's.")
    key = {}
    for saved_group, group in zip(saved["param_groups"], groups):
        for index, param in zip(saved_group["params"], group["params"]):
            key[index] = names[id(param)]
    by_name = {
        "state": {key[index]: value for index, value in saved["state"].items()},
        "param_groups": [{**g, "params": [key[i] for i in g["params"]]} for g in saved["param_groups"]],
    }
    # Every process read the whole file; each keeps the slice of its own shards.
    set_optimizer_state_dict(model, state.optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def load_training_state(state, directory: str, info, *, allow_unsafe: bool = False) -> None:
    """Reads optimizer, scheduler, scaler and RNG state written by save_training_state (or by HF).

    Every .pt/.pth file is read with weights_only=True; `allow_unsafe` (allow_unsafe_checkpoint_load)
    unpickles the ones the safe loader refuses.
    """
    shards = os.path.join(directory, OPTIMIZER_SHARDS_DIR)
    path = os.path.join(directory, OPTIMIZER_NAME)
    if os.path.isdir(shards):
        _load_sharded_optimizer(state, shards, info)
    elif not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory} has no {OPTIMIZER_NAME}: it cannot be resumed (was it saved with save_only_model?)."
        )
    elif info.sharded:
        _load_full_optimizer_sharded(state, path, allow_unsafe)
    else:
        state.optimizer.load_state_dict(_load(path, allow_unsafe=allow_unsafe))
    sched = os.path.join(directory, "scheduler.pt")
    if os.path.isfile(sched):
        state.scheduler.load_state_dict(_load(sched, allow_unsafe=allow_unsafe))
    scaler = os.path.join(directory, "scaler.pt")
    if state.scaler is not None and os.path.isfile(scaler):
        state.scaler.load_state_dict(_load(scaler, allow_unsafe=allow_unsafe))
    rng_path = _rng_file(directory, info)
    if os.path.isfile(rng_path):
        rng = _load(rng_path, allow_unsafe=allow_unsafe)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.random.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and "cuda" in rng:
            if info.world_size > 1:
                torch.cuda.random.set_rng_state_all(rng["cuda"])
            else:
                torch.cuda.random.set_rng_state(rng["cuda"])
