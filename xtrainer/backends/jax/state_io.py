"""Orbax checkpoints of the JAX train state, and model export.

The train state (params, optimizer state, RNG, step, loss scale) is one pytree saved with orbax
into `<checkpoint>/jax_state/`; restoring it takes the *current* shardings as the target, so a
checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from ...checkpoint import writing

STATE_DIR = "jax_state"
FLAX_WEIGHTS_NAME = "flax_model.msgpack"


def save_state(state: dict, directory: str) -> None:
    """Writes the state with orbax and waits for it (the caller publishes the directory afterwards)."""
    start_save(state, directory)()


def start_save(state: dict, directory: str, *, barrier_sync_fn=None, timeout_s: float | None = None):
    """Starts an orbax save of the state; returns the function that waits for it to be on disk.

    Orbax copies the arrays to host memory before this returns (so the next step may donate and
    overwrite them) and writes the files in its own background thread; the returned function
    joins it and raises its error. Several processes: `barrier_sync_fn` replaces orbax's barrier
    between them (multihost.failure_aware_barrier), `timeout_s` bounds each wait.
    """
    import orbax.checkpoint as ocp

    options = {}
    if barrier_sync_fn is not None or timeout_s:
        defaults = ocp.options.AsyncOptions()
        options["async_options"] = ocp.options.AsyncOptions(
            timeout_secs=int(timeout_s or defaults.timeout_secs), barrier_sync_fn=barrier_sync_fn
        )
    checkpointer = ocp.StandardCheckpointer(**options)
    path = os.path.abspath(os.path.join(directory, STATE_DIR))
    try:
        with writing(path):
            checkpointer.save(path, _empty_arrays_as_none(state))
    except BaseException:
        checkpointer.close()
        raise

    def finish() -> None:
        try:
            with writing(path):
                checkpointer.wait_until_finished()
        finally:  # also on a failed write (full disk): no background thread outlives the save
            checkpointer.close()

    return finish


def restore_state(state: dict, directory: str) -> dict:
    """Reads a state saved by save_state, laid out like `state` (same shardings, possibly another mesh)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.join(directory, STATE_DIR))
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{directory} has no {STATE_DIR}/: it was not written by the JAX backend (a torch checkpoint?)."
        )
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x, state
    )
    leaves, treedef = jax.tree.flatten(target)
    target = treedef.unflatten([None if _is_empty(x) else x for x in leaves])
    checkpointer = ocp.StandardCheckpointer()
    try:
        try:
            restored = _refill_empty_arrays(checkpointer.restore(path, target), leaves, treedef)
        except Exception:
            legacy = _variable_layout_target(checkpointer, path, target)
            if legacy is None:
                raise
            restored = _from_variable_layout(checkpointer.restore(path, legacy), target)
    except Exception as exc:  # shape/structure mismatch or a damaged file: say what and where
        mismatch = _describe_mismatch(path, target)
        raise ValueError(f"Cannot restore the JAX train state from {path}: {mismatch or exc}") from exc
    finally:
        checkpointer.close()
    return restored


def _is_empty(x) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and math.prod(x.shape) == 0


def _empty_arrays_as_none(state):
    """Zero-size arrays (an empty buffer of a torch module) as None: orbax refuses to write them, and they
    hold nothing but their shape, which the restore target brings back."""
    leaves, treedef = jax.tree.flatten(state)
    return treedef.unflatten([None if _is_empty(x) else x for x in leaves])


def _refill_empty_arrays(restored, target_leaves, treedef):
    """The restored tree with each zero-size leaf of the target made again (empty, with its sharding)."""
    got = treedef.flatten_up_to(restored)  # None where the target had a zero-size leaf
    filled = [
        jax.device_put(jnp.zeros(t.shape, t.dtype), t.sharding) if _is_empty(t) and t.sharding is not None
        else jnp.zeros(t.shape, t.dtype) if _is_empty(t) else value
        for value, t in zip(got, target_leaves)
    ]
    return treedef.unflatten(filled)


def _variable_layout_target(checkpointer, path: str, target):
    """The target in the layout of checkpoints whose NNX state was saved as Variables, or None.

    Before the train state held plain arrays, each NNX leaf (parameters, their optimizer moments,
    RNG streams) was saved one level deeper, under "value". This mirrors the checkpoint's metadata.
    """
    try:
        saved = checkpointer.metadata(path)
        saved = getattr(saved, "item_metadata", saved)
        saved = getattr(saved, "tree", saved)  # orbax's metadata keeps namedtuples as dicts, tuples as lists
    except Exception:  # no readable metadata: nothing to mirror
        return None
    changed = []

    def mirror(node, meta):
        if hasattr(node, "_fields") and isinstance(meta, dict):  # an optax state (namedtuple)
            return type(node)(*(mirror(getattr(node, f), meta[f]) if f in meta else getattr(node, f)
                                for f in node._fields))
        if isinstance(node, dict) and isinstance(meta, dict):
            return {k: mirror(v, meta[k]) if k in meta else v for k, v in node.items()}
        if isinstance(node, (list, tuple)) and isinstance(meta, (list, tuple)) and len(node) == len(meta):
            return type(node)(mirror(v, m) for v, m in zip(node, meta))
        if isinstance(node, jax.ShapeDtypeStruct) and isinstance(meta, dict) and set(meta) == {"value"}:
            changed.append(True)
            return {"value": node}
        return node

    legacy = mirror(target, saved)
    return legacy if changed else None


def _from_variable_layout(restored, target):
    """Undoes _variable_layout_target: the restored state without the "value" levels."""
    if isinstance(target, dict):
        return {k: _from_variable_layout(restored[k], v) for k, v in target.items()}
    if hasattr(target, "_fields"):
        return type(target)(*(_from_variable_layout(getattr(restored, f), getattr(target, f)) for f in target._fields))
    if isinstance(target, (list, tuple)):
        return type(target)(_from_variable_layout(r, t) for r, t in zip(restored, target))
    if isinstance(target, jax.ShapeDtypeStruct) and isinstance(restored, dict) and set(restored) == {"value"}:
        return restored["value"]
    return restored


def _flat_shapes(tree) -> dict[str, tuple]:
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        shape = getattr(leaf, "shape", None)
        if shape is not None:
            out[".".join(p for p in parts if p != "value")] = tuple(shape)
    return out


def _describe_mismatch(path: str, target) -> str | None:
    """Which parameters differ between a checkpoint and the model (from the checkpoint's metadata), or None."""
    import orbax.checkpoint as ocp

    try:
        metadata = ocp.StandardCheckpointer().metadata(path)
        saved = _flat_shapes(getattr(metadata, "item_metadata", metadata))
    except Exception:  # unreadable metadata: the caller reports the original error
        return None
    wanted = _flat_shapes(target)
    problems = [f"{k}: checkpoint {saved[k]} vs model {wanted[k]}" for k in wanted if k in saved and saved[k] != wanted[k]]
    problems += [f"{k}: missing from the checkpoint" for k in wanted if k not in saved]
    problems += [f"{k}: in the checkpoint, not in the model" for k in saved if k not in wanted]
    if not problems:
        return None
    problems.sort(key=lambda p: not p.startswith("params"))  # parameters first: they name the model change
    more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
    return (
        f"it was written for a different model; shape mismatch in {'; '.join(problems[:4])}{more}. Resume with the "
        "same model architecture and config as the checkpoint, or train without resume_from_checkpoint."
    )


def export_params(adapter, params, extra, directory: str) -> list[str]:
    """Writes the model where its own library loads it from; returns the files written.

    Reference models with a transformers twin are exported as config.json + model.safetensors
    (transformers' from_pretrained loads them); any model also gets flax_model.msgpack (Flax's
    serialization of the parameter pytree).
    """
    from flax import serialization

    os.makedirs(directory, exist_ok=True)
    written = []
    model = adapter.write_back(params, extra)
    if adapter.kind == "torchax":
        # A torch module is written as the torch backend writes it: save_pretrained for a transformers model,
        # else its state_dict as model.safetensors (what transformers' Trainer writes for a plain nn.Module).
        from ..torch.state_io import write_model_weights

        before = set(os.listdir(directory))
        write_model_weights(model, directory)
        return sorted(set(os.listdir(directory)) - before)
    exporter = getattr(model, "save_pretrained", None)
    if not callable(exporter) and type(model).__module__.startswith("xtrainer.models"):
        from ...models import save_pretrained  # reference models: transformers' format

        exporter = lambda d: save_pretrained(model, d)  # noqa: E731
    if callable(exporter):
        exporter(directory)
        written += ["config.json", "model.safetensors"]
    host = jax.device_get(_pure(params))
    with open(os.path.join(directory, FLAX_WEIGHTS_NAME), "wb") as f:
        f.write(serialization.to_bytes(host))
    written.append(FLAX_WEIGHTS_NAME)
    with open(os.path.join(directory, "xtrainer_model.json"), "w") as f:
        json.dump({"kind": adapter.kind, "class": type(model).__name__}, f)
    return written


def _pure(tree):
    """nnx.State / Variables -> plain nested dicts of arrays, for serialisation."""
    to_pure = getattr(tree, "to_pure_dict", None)
    if callable(to_pure):
        return to_pure()
    return jax.tree.map(lambda x: np.asarray(x) if hasattr(x, "shape") else x, tree)
