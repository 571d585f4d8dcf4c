"""The training data's position in a checkpoint: `checkpoint-N/data_state/process-<i>.json`.

Each process writes where its train loader stands after the last trained micro-batch: the epoch, the
batches done in it, and, for a stream or a stateful loader of the user's (torchdata's
StatefulDataLoader, a Grain iterator), that object's own state. A resume reads it back, so the run
continues with exactly the batches an uninterrupted run would have trained on, at a cost that
depends on the size of the state, not on the position in the epoch.

Checkpoints without the file (written by transformers, or by earlier builds) resume as before: the
position is derived from the global step (transformers' rule).

The state is JSON. Values JSON has no type for (bytes, NumPy arrays, torch tensors, tuples) are
written as small tagged objects and read back as what they were; nothing is unpickled.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DIRECTORY = "data_state"
FORMAT_VERSION = 1


def file_name(process_index: int) -> str:
    return os.path.join(DIRECTORY, f"process-{process_index}.json")


def save(checkpoint_dir: str, loader: Any, position: tuple[int, int] | None, process_index: int, run_info: dict) -> None:
    """Writes this process's loader position into an (unpublished) checkpoint directory.

    Args:
        loader: the train loader (anything with `state_dict(epoch, batches_done)`).
        position: (epoch, micro-batches of it trained on), or None before the first step.
        run_info: what the position means (global batch size, dataset length, sampling): checked on resume.
    """
    if position is None or not hasattr(loader, "state_dict"):
        return
    epoch, batches_done = position
    try:
        state = loader.state_dict(epoch, batches_done)
    except ValueError as exc:  # the position is no longer known (it never is in normal training): save the rest
        logger.warning("The train loader's position is not saved in this checkpoint (%s); a resume from it derives "
                       "the position from the global step.", exc)
        return
    record = {"version": FORMAT_VERSION, "process_index": process_index, "run": run_info, "loader": _encode(state)}
    path = os.path.join(checkpoint_dir, file_name(process_index))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".partial", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(path + ".partial", path)


def read(checkpoint_dir: str, process_index: int) -> dict | None:
    """The record this process saved, or None when the checkpoint has no data state (older or transformers')."""
    path = os.path.join(checkpoint_dir, file_name(process_index))
    if not os.path.isfile(path):
        # Only process 0 wrote one: its position is every process's when it holds no per-process state
        # (a map-style dataset's epoch and batch are the same everywhere; a stream's own state is not).
        first = os.path.join(checkpoint_dir, file_name(0))
        if process_index == 0 or not os.path.isfile(first):
            return None
        with open(first) as f:
            record = json.load(f)
        if "stream_state" in record["loader"] or "loader_state" in record["loader"]:
            return None
        path = first
    else:
        with open(path) as f:
            record = json.load(f)
    if record.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has data-state format {record.get('version')}, this build reads {FORMAT_VERSION}.")
    record["loader"] = _decode(record["loader"])
    return record


def resume_position(
    checkpoint_dir: str, loader: Any, process_index: int, run_info: dict, derived: tuple[int, int]
) -> tuple[int, int]:
    """(epoch, micro-batches to start at) for a resume, loading the loader's saved state into it.

    `derived` is the position transformers' rule gives from the global step; it is used when the
    checkpoint has no data state (or the loader cannot load one).
    """
    record = read(checkpoint_dir, process_index)
    if record is None or not hasattr(loader, "load_state_dict"):
        return derived
    changed = sorted(k for k in set(run_info) | set(record["run"]) if run_info.get(k) != record["run"].get(k))
    if changed:
        logger.warning(
            "The training data settings differ from the checkpoint's (%s): resuming at the saved batch number "
            "of the saved epoch, so the examples after the resume point are not those the interrupted run "
            "would have seen.", ", ".join(f"{k}: {record['run'].get(k)} -> {run_info.get(k)}" for k in changed)
        )
    return loader.load_state_dict(record["loader"])


# ---------------------------------------------------------------------------------------------
# JSON with a few tagged types
# ---------------------------------------------------------------------------------------------

_TAG = "__xtrainer_type__"


def _encode(value: Any) -> Any:
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {_TAG: "dict", "items": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {_TAG: "tuple", "items": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return {_TAG: "bytes", "b64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return {_TAG: "ndarray", "dtype": str(value.dtype), "shape": list(value.shape),
                "b64": base64.b64encode(np.ascontiguousarray(value).tobytes()).decode("ascii")}
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor (RNG states of samplers)
        array = value.detach().cpu().numpy()
        return {_TAG: "torch", "array": _encode(array)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"The train loader's state holds a {type(value).__name__}, which the data state file cannot store "
        "(it takes dicts, lists, tuples, numbers, strings, bytes and arrays)."
    )


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    kind = value.get(_TAG)
    if kind is None:
        return {k: _decode(v) for k, v in value.items()}
    if kind == "dict":
        return {_decode(k): _decode(v) for k, v in value["items"]}
    if kind == "tuple":
        return tuple(_decode(v) for v in value["items"])
    if kind == "bytes":
        return base64.b64decode(value["b64"])
    if kind == "ndarray":
        raw = base64.b64decode(value["b64"])
        return np.frombuffer(raw, dtype=np.dtype(value["dtype"])).reshape(value["shape"]).copy()
    if kind == "torch":
        import torch

        return torch.from_numpy(_decode(value["array"]))
    raise ValueError(f"Unknown tagged value {kind!r} in a data state file.")
