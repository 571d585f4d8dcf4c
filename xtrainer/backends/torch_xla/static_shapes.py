"""Static shapes for XLA: padding host batches to fixed shapes, and naming what made a graph recompile.

XLA compiles one program per distinct set of input shapes, so a short last batch or a batch padded
to its own longest sequence would each cost a compilation (seconds to minutes on a real model).
Everything here is host-side numpy, applied before a batch is sent to the device:

- rows: a short batch is padded to the full batch size with rows whose labels are all -100 and
  whose inputs are 0. The -100 ignore index makes those rows carry no loss, and the label count the
  front computes (HF's num_items_in_batch) comes from the real rows, so the step is unchanged. Done
  only when every label array is an integer array named like a label; otherwise (float regression
  targets, QA start/end positions, no labels) the batch stays short.
- sequence: when examples have different lengths (a dynamic-padding collator), the sequence dim of
  every array shaped like `input_ids` is padded up to a bucket (the next power of two by default,
  capped at the model's maximum positions) with attention_mask 0, labels -100 and other inputs 0.
  Done only where it cannot change the real positions' results: the batch has an attention_mask,
  or the model is a causal LM (right padding never reaches earlier positions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100

Signature = tuple  # one entry per micro-batch: ((key, shape, dtype), ...)


@dataclass(frozen=True)
class PadPolicy:
    """How host batches are padded (see the module docstring)."""

    rows: bool = True
    #: "pow2" (next power of two), an int (next multiple of it), or None (never pad sequences)
    seq_bucket: str | int | None = "pow2"
    #: the model's maximum sequence length, a cap for the bucket (None: no cap)
    max_positions: int | None = None
    #: whether the model is a causal LM (right padding is then safe without an attention_mask)
    causal: bool = False


@dataclass(frozen=True)
class Padded:
    """A padded host batch and the real extent of its rows and sequence positions."""

    batch: dict
    rows: int
    seq: int | None
    padded_rows: int
    padded_seq: int | None

    @property
    def changed(self) -> bool:
        return self.rows != self.padded_rows or self.seq != self.padded_seq


def batch_rows(batch: Mapping[str, np.ndarray]) -> int:
    """Rows of a host batch (the leading dim of its first array; 0 for an empty batch)."""
    for value in batch.values():
        value = np.asarray(value)
        return int(value.shape[0]) if value.ndim else 1
    return 0


def _is_label_key(key: str, label_names: Sequence[str]) -> bool:
    return "label" in key or key in label_names


def can_pad_rows(batch: Mapping[str, np.ndarray], label_names: Sequence[str] = (), *, need_labels: bool = True) -> bool:
    """Whether padding rows leaves the loss unchanged: every label array is an integer '*label*' array.

    need_labels=False (evaluation, where padded rows are cut off the outputs again) also allows a
    batch without labels.
    """
    keys = [k for k in batch if _is_label_key(k, label_names)]
    if not keys:
        return not need_labels
    return all("label" in k and np.issubdtype(np.asarray(batch[k]).dtype, np.integer) for k in keys)


def seq_length(batch: Mapping[str, np.ndarray]) -> int | None:
    """The sequence length of a token batch (dim 1 of `input_ids`), or None when there is none."""
    ids = batch.get("input_ids")
    if ids is None:
        return None
    ids = np.asarray(ids)
    return int(ids.shape[1]) if ids.ndim >= 2 else None


def seq_bucket(length: int, policy: PadPolicy) -> int:
    """The padded length for a sequence of `length` positions under `policy` (never shorter)."""
    if policy.seq_bucket in (None, 0, False):
        return length
    if policy.seq_bucket == "pow2":
        target = 1 << max(0, math.ceil(math.log2(max(length, 1))))
    else:
        multiple = int(policy.seq_bucket)
        target = -(-length // multiple) * multiple
    if policy.max_positions:
        target = min(target, int(policy.max_positions))
    return max(target, length)


def can_pad_seq(batch: Mapping[str, np.ndarray], policy: PadPolicy, label_names: Sequence[str] = ()) -> bool:
    """Whether right-padding the sequence dim cannot change the real positions' results."""
    if policy.seq_bucket in (None, 0, False) or seq_length(batch) is None:
        return False
    labels_ok = all(
        np.issubdtype(np.asarray(v).dtype, np.integer) for k, v in batch.items() if _is_label_key(k, label_names)
    )
    return labels_ok and ("attention_mask" in batch or policy.causal)


def _pad_axis(value: np.ndarray, axis: int, size: int, fill) -> np.ndarray:
    have = value.shape[axis]
    if have >= size:
        return value
    widths = [(0, 0)] * value.ndim
    widths[axis] = (0, size - have)
    return np.pad(value, widths, constant_values=fill)


def pad_batch(
    batch: Mapping[str, np.ndarray],
    rows: int | None,
    policy: PadPolicy,
    label_names: Sequence[str] = (),
    *,
    need_labels: bool = True,
) -> Padded:
    """Pads `batch` to `rows` rows and a bucketed sequence length where that is safe (module docstring).

    Args:
        batch: the host batch (numpy arrays with a leading batch dim).
        rows: the full batch size to pad a short batch to (None: keep the rows).
        policy: the padding policy.
        label_names: the model's label argument names (arrays padded with -100).
        need_labels: False in evaluation, where padded rows are cut off the outputs again.
    """
    arrays = {k: np.asarray(v) for k, v in batch.items()}
    real_rows = batch_rows(arrays)
    real_seq = seq_length(arrays)
    target_rows = real_rows
    if policy.rows and rows is not None and real_rows < rows and can_pad_rows(arrays, label_names, need_labels=need_labels):
        target_rows = rows
    target_seq = real_seq
    if real_seq is not None and can_pad_seq(arrays, policy, label_names):
        target_seq = seq_bucket(real_seq, policy)
    if target_rows == real_rows and target_seq == real_seq:
        return Padded(arrays, real_rows, real_seq, real_rows, real_seq)
    out = {}
    for key, value in arrays.items():
        fill = IGNORE_INDEX if _is_label_key(key, label_names) else 0
        if value.dtype == np.bool_:
            fill = False
        if target_seq != real_seq and value.ndim >= 2 and value.shape[1] == real_seq:
            value = _pad_axis(value, 1, target_seq, fill)
        if target_rows != real_rows and value.ndim >= 1:
            value = _pad_axis(value, 0, target_rows, fill)
        out[key] = value
    return Padded(out, real_rows, real_seq, target_rows, target_seq)


def batch_signature(batch: Mapping[str, np.ndarray]) -> tuple:
    """(key, shape, dtype) of each array, sorted by key: what an XLA graph is specialised on."""
    return tuple(sorted((k, tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in batch.items()))


def describe_change(old: tuple | None, new: tuple) -> str:
    """Names what differs between two train-step signatures.

    A signature is (window, with_items, optimizer_ready): one `batch_signature` per micro-batch of
    the accumulation window, whether a label count is passed, and whether the optimizer state
    existed before the step.
    """
    if old is None:
        return "first compilation"
    (old_window, old_items, old_ready), (new_window, new_items, new_ready) = old, new
    changes = []
    if len(old_window) != len(new_window):
        changes.append(f"accumulation window of {len(new_window)} micro-batches instead of {len(old_window)}")
    for index, (a, b) in enumerate(zip(old_window, new_window)):
        shapes_a = {k: (s, d) for k, s, d in a}
        shapes_b = {k: (s, d) for k, s, d in b}
        for key in sorted(set(shapes_a) | set(shapes_b)):
            if shapes_a.get(key) != shapes_b.get(key):
                before = shapes_a.get(key, ("absent", ""))
                after = shapes_b.get(key, ("absent", ""))
                where = f" (micro-batch {index})" if len(new_window) > 1 else ""
                changes.append(f"batch shape changed: '{key}' {_fmt(before)} -> {_fmt(after)}{where}")
        if changes:
            break
    if old_items != new_items:
        changes.append("num_items_in_batch appeared" if new_items else "num_items_in_batch disappeared")
    if old_ready != new_ready:
        changes.append(
            "the optimizer state exists now (the first optimizer step creates it: expected once)"
            if new_ready
            else "the optimizer state is gone"
        )
    if not changes:
        return (
            "the traced graph changed although the input shapes did not (a Python number baked into the "
            "graph, data-dependent control flow, or a host read of a device value inside the model)"
        )
    return "; ".join(changes)


def _fmt(entry) -> str:
    shape, dtype = entry
    return f"{shape} {dtype}".strip() if not isinstance(shape, str) else shape
