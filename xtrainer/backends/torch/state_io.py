"""Torch model / optimizer / scheduler / RNG files in transformers' checkpoint layout.

File names and contents match what transformers' Trainer writes (model.safetensors, config.json,
optimizer.pt, scheduler.pt, scaler.pt, rng_state[_N].pth), so checkpoints move both ways.
Everything is read with `weights_only=True`: loading a checkpoint never runs pickled code.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch
from torch import nn

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"


def _full_state_dict(model: nn.Module, info) -> dict[str, torch.Tensor]:
    if info.fsdp and info.world_size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


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


def save_model_weights(model: nn.Module, directory: str, info) -> None:
    """Writes the model as its library loads it: save_pretrained for HF models, else model.safetensors."""
    state_dict = _full_state_dict(model, info)
    if not info.is_main:
        return
    os.makedirs(directory, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory, state_dict=state_dict)
        return
    from safetensors.torch import save_file

    save_file(_dedupe_shared(state_dict), os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})


def read_weights(directory: str) -> dict[str, torch.Tensor]:
    """Reads model weights from a checkpoint directory (single or sharded safetensors, or legacy .bin)."""
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
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or corrupt file: say which one
        raise ValueError(f"Cannot read the model weights in {directory}: {exc}") from exc
    raise FileNotFoundError(
        f"No model weights in {directory}: expected {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or {LEGACY_WEIGHTS_NAME}."
    )


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that alias another parameter (saved once, restored by the tie)."""
    by_storage: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_storage.setdefault(tensor.data_ptr(), []).append(name)
    return {n for names in by_storage.values() if len(names) > 1 for n in names}


def load_model_weights(model: nn.Module, directory: str, info) -> None:
    """Loads weights into the model, with a clear error when they belong to another model."""
    state_dict = read_weights(directory) if info.is_main or not info.fsdp else {}
    if info.fsdp and info.world_size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(
            model, state_dict, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        return
    own = model.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(k for k in state_dict if k in own and tuple(own[k].shape) != tuple(state_dict[k].shape))
    missing = sorted(set(own) - set(state_dict) - _tied_names(model))
    if unexpected or mismatched or missing:
        detail = "; ".join(
            f"{label}: {names[:5]}{' ...' if len(names) > 5 else ''}"
            for label, names in (("unexpected", unexpected), ("shape mismatch", mismatched), ("missing", missing))
            if names
        )
        raise ValueError(
            f"The checkpoint {directory} does not match {type(model).__name__} ({detail}). "
            "Was it written for a different model or config?"
        )
    model.load_state_dict(state_dict, strict=False)


def _rng_file(directory: str, info) -> str:
    name = "rng_state.pth" if info.world_size <= 1 else f"rng_state_{info.rank}.pth"
    return os.path.join(directory, name)


def save_training_state(state, directory: str, info) -> None:
    """optimizer.pt / scheduler.pt (rank 0, or one shard per rank under FSDP) and per-rank RNG."""
    os.makedirs(directory, exist_ok=True)
    if info.fsdp and info.world_size > 1:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optimizer": get_optimizer_state_dict(state.model, state.optimizer)},
                 checkpoint_id=os.path.join(directory, "optimizer_shards"))
    elif info.is_main:
        torch.save(state.optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
    if info.is_main:
        torch.save(state.scheduler.state_dict(), os.path.join(directory, "scheduler.pt"))
        if state.scaler is not None:
            torch.save(state.scaler.state_dict(), os.path.join(directory, "scaler.pt"))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.random.get_rng_state_all() if info.world_size > 1 else torch.cuda.random.get_rng_state()
    torch.save(rng, _rng_file(directory, info))


def _load(path: str, device=None):
    try:
        with _numpy_safe_globals():
            return torch.load(path, map_location=device or "cpu", weights_only=True)
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


def load_training_state(state, directory: str, info) -> None:
    """Reads optimizer, scheduler, scaler and RNG state written by save_training_state (or by HF)."""
    shards = os.path.join(directory, "optimizer_shards")
    if info.fsdp and info.world_size > 1 and os.path.isdir(shards):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        holder = {"optimizer": get_optimizer_state_dict(state.model, state.optimizer)}
        dcp.load(holder, checkpoint_id=shards)
        set_optimizer_state_dict(state.model, state.optimizer, holder["optimizer"])
    else:
        path = os.path.join(directory, "optimizer.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} has no optimizer.pt: it cannot be resumed (was it saved with save_only_model?).")
        state.optimizer.load_state_dict(_load(path))
    sched = os.path.join(directory, "scheduler.pt")
    if os.path.isfile(sched):
        state.scheduler.load_state_dict(_load(sched))
    scaler = os.path.join(directory, "scaler.pt")
    if state.scaler is not None and os.path.isfile(scaler):
        state.scaler.load_state_dict(_load(scaler))
    rng_path = _rng_file(directory, info)
    if os.path.isfile(rng_path):
        rng = _load(rng_path)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.random.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and "cuda" in rng:
            if info.world_size > 1:
                torch.cuda.random.set_rng_state_all(rng["cuda"])
            else:
                torch.cuda.random.set_rng_state(rng["cuda"])
