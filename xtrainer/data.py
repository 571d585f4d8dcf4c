"""The backend-neutral host data pipeline: sampling order, batching, column filtering, collation.

Every backend gets its batches from here as `dict[str, np.ndarray]`, so equal seeds and arguments
give equal data order on every backend. The order of an epoch is a pure function of
(strategy, seed, epoch), which is what makes a mid-epoch resume exact: skipping k batches is index
arithmetic, not replaying the data.

Distributed layout: each *global* micro-batch is `batch_size * num_processes` consecutive indices of
the epoch order, and process p takes the p-th slice of it. One process with the global batch size
therefore sees exactly the union of what N processes see.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .trainer_utils import TrainSamplingStrategy

Batch = dict[str, np.ndarray]

# Group-by-length sorts inside windows of this many batches, so batches hold similar lengths while
# the epoch order stays random (the same trade-off HF's LengthGroupedSampler makes).
_LENGTH_GROUP_WINDOW = 50


# ---------------------------------------------------------------------------------------------
# Dataset access
# ---------------------------------------------------------------------------------------------


def has_length(dataset: Any) -> bool:
    """True when the dataset is map-style (has __len__ and __getitem__), False for streams."""
    if is_iterable_dataset(dataset):
        return False
    try:
        len(dataset)
    except (TypeError, NotImplementedError):
        return False
    return hasattr(dataset, "__getitem__")


def is_iterable_dataset(dataset: Any) -> bool:
    """True for torch/datasets IterableDatasets and plain iterators (streams without a length)."""
    kind = type(dataset).__name__
    if kind in ("IterableDataset", "IterableDatasetShard"):
        return True
    for klass in type(dataset).__mro__:
        if klass.__name__ == "IterableDataset":
            return True
    return not hasattr(dataset, "__getitem__") and hasattr(dataset, "__iter__")


def dataset_columns(dataset: Any) -> list[str] | None:
    """Column names of a `datasets.Dataset`, else None."""
    names = getattr(dataset, "column_names", None)
    return list(names) if isinstance(names, (list, tuple)) else None


def fetch_examples(dataset: Any, indices: Sequence[int]) -> list[dict]:
    """Fetches examples as a list of feature dicts.

    `datasets.Dataset` is read with one batched `__getitems__` call, which is much faster than one
    lookup per row.
    """
    getitems = getattr(dataset, "__getitems__", None)
    if getitems is not None:
        rows = getitems(list(int(i) for i in indices))
        if isinstance(rows, Mapping):  # column-major answer
            keys = list(rows)
            return [{k: rows[k][j] for k in keys} for j in range(len(indices))]
        return list(rows)
    return [dataset[int(i)] for i in indices]


# ---------------------------------------------------------------------------------------------
# Sampling order
# ---------------------------------------------------------------------------------------------


def epoch_order(
    num_examples: int,
    strategy: str | TrainSamplingStrategy,
    seed: int,
    epoch: int,
    lengths: Sequence[int] | None = None,
    group_size: int = 1,
) -> np.ndarray:
    """The index order of one training epoch.

    Args:
        num_examples: dataset length.
        strategy: "random", "sequential" or "group_by_length".
        seed: `data_seed` if set, else `seed`.
        epoch: the epoch number; each epoch gets its own permutation, reproducibly.
        lengths: per-example lengths, required for "group_by_length".
        group_size: examples per optimizer step (batch x processes x accumulation) for grouping.

    Returns:
        An int64 array, a permutation of range(num_examples).
    """
    strategy = TrainSamplingStrategy(strategy)
    if strategy is TrainSamplingStrategy.SEQUENTIAL:
        return np.arange(num_examples, dtype=np.int64)
    rng = np.random.default_rng([int(seed) % (2**32), int(epoch)])
    order = rng.permutation(num_examples).astype(np.int64)
    if strategy is TrainSamplingStrategy.RANDOM:
        return order
    if lengths is None or len(lengths) != num_examples:
        raise ValueError(
            "train_sampling_strategy='group_by_length' needs one length per example: add a "
            "`length` column (or set `length_column_name`), or give examples an `input_ids` field."
        )
    lengths = np.asarray(lengths)
    window = max(1, group_size * _LENGTH_GROUP_WINDOW)
    chunks = []
    for start in range(0, num_examples, window):
        chunk = order[start : start + window]
        # Stable descending sort keeps ties in their random order.
        chunks.append(chunk[np.argsort(-lengths[chunk], kind="stable")])
    return np.concatenate(chunks) if chunks else order


def example_lengths(dataset: Any, length_column_name: str = "length", input_name: str = "input_ids") -> list[int]:
    """Per-example lengths for length grouping: a length column if present, else len(input_ids)."""
    columns = dataset_columns(dataset)
    if columns is not None and length_column_name in columns:
        return [int(x) for x in dataset[length_column_name]]
    first = dataset[0]
    if not isinstance(first, Mapping) or input_name not in first:
        raise ValueError(
            f"train_sampling_strategy='group_by_length' cannot infer lengths: examples have no "
            f"'{input_name}' field and the dataset has no '{length_column_name}' column."
        )
    return [len(dataset[i][input_name]) for i in range(len(dataset))]


# ---------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------


def to_numpy(value: Any) -> Any:
    """Turns a torch tensor / jax array / list into a numpy array (zero-copy for CPU torch tensors)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    if hasattr(value, "__array__") and not isinstance(value, (list, tuple)):
        return np.asarray(value)
    return value


def _looks_like_tensor_feature(name: str) -> bool:
    """Fields that must reach the model as arrays (a string there means the text was not tokenised)."""
    return name.endswith(("_ids", "_mask")) or "label" in name or name in ("input_values", "pixel_values")


def _stack_feature(name: str, values: list) -> np.ndarray:
    try:
        return _stack_values(name, values)
    except (TypeError, ValueError) as exc:
        if str(exc).startswith(("Cannot batch feature", "Feature '")):
            raise
        kinds = sorted({type(v).__name__ for v in values})
        raise ValueError(
            f"Cannot batch feature '{name}': its values in this batch have types {kinds} ({exc}). Every example "
            f"must hold the same kind of value (numbers or equal-shape arrays) in '{name}': fix or filter the "
            "examples, or pass a `data_collator` that handles them."
        ) from exc


def _stack_values(name: str, values: list) -> np.ndarray:
    first = values[0]
    if isinstance(first, bool):
        return np.asarray(values, dtype=np.bool_)
    if isinstance(first, (int, np.integer)):
        return np.asarray(values, dtype=np.int64)
    if isinstance(first, (float, np.floating)) and not isinstance(first, np.ndarray):
        # Python floats become float32, as torch.tensor(list_of_floats) does in HF's collator.
        return np.asarray(values, dtype=np.float32)
    arrays = [to_numpy(v) for v in values]
    arrays = [np.asarray(a) for a in arrays]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(
            f"Cannot batch feature '{name}': examples have different shapes {sorted(shapes)[:4]}. "
            "Pad them to one length, or pass a padding collator (e.g. transformers' "
            "DataCollatorWithPadding / DataCollatorForLanguageModeling) as `data_collator`."
        )
    out = np.stack(arrays)
    if out.dtype == np.float64:
        out = out.astype(np.float32)
    return out


def default_data_collator(features: list[Mapping[str, Any]]) -> Batch:
    """Stacks a list of feature dicts into a numpy batch, with HF's default-collator conventions.

    `label` / `label_ids` become `labels`; integer features become int64 and floats float32;
    None and string values are dropped.
    """
    if not features:
        raise ValueError("Cannot collate an empty list of examples.")
    if not isinstance(features[0], Mapping):
        raise TypeError(
            f"Examples must be dicts of features (got {type(features[0]).__name__}); "
            "wrap them as {'input_ids': ..., 'labels': ...} or pass a `data_collator`."
        )
    first = features[0]
    batch: Batch = {}
    for source, target in (("label", "labels"), ("label_ids", "labels")):
        if source in first and first[source] is not None:
            batch[target] = _stack_feature(source, [f[source] for f in features])
    for name, value in first.items():
        if isinstance(value, str) and _looks_like_tensor_feature(name):
            raise ValueError(
                f"Feature '{name}' holds strings (e.g. {value[:40]!r}), which cannot be batched into an array: tokenise "
                "the text first (e.g. dataset.map(lambda ex: tokenizer(ex['text']))), or pass a `data_collator` that does."
            )
        if name in ("label", "label_ids") or value is None or isinstance(value, str):
            continue
        missing = [i for i, f in enumerate(features) if name not in f]
        if missing:
            raise ValueError(f"Feature '{name}' is missing from example {missing[0]} of the batch.")
        batch[name] = _stack_feature(name, [f[name] for f in features])
    return batch


def batch_to_numpy(batch: Any) -> Batch:
    """Normalises a collator's output (dict/BatchEncoding of tensors or arrays) to a numpy dict."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"The data collator must return a dict of arrays, got {type(batch).__name__}."
        )
    out = {}
    for key, value in batch.items():
        if value is None:
            continue
        out[key] = to_numpy(value)
        _check_array(key, out[key])
    check_batch_shapes(out)
    return out


#: Fields that hold one value per token of `input_ids` (so they must have its shape).
_TOKEN_ALIGNED = ("attention_mask", "token_type_ids", "position_ids", "special_tokens_mask")


def check_batch_shapes(batch: Mapping[str, np.ndarray]) -> None:
    """Fails, naming the key, when a collated batch's fields disagree (a model would fail deep inside).

    Token-aligned fields must have the shape of `input_ids` (`decoder_attention_mask`: of
    `decoder_input_ids`), and `labels` the same number of rows. Other fields are left alone (a
    flattening collator's `cu_seq_lens` legitimately has its own shape).
    """
    pairs = [("input_ids", key, True) for key in _TOKEN_ALIGNED]
    pairs += [("input_ids", "labels", False), ("decoder_input_ids", "decoder_attention_mask", True)]
    for reference, key, whole_shape in pairs:
        ref, value = batch.get(reference), batch.get(key)
        ref_shape, shape = getattr(ref, "shape", None), getattr(value, "shape", None)
        if not ref_shape or not shape:
            continue
        if whole_shape and shape != ref_shape:
            raise ValueError(
                f"The data collator returned inconsistent shapes: '{key}' has shape {tuple(shape)} but '{reference}' "
                f"has {tuple(ref_shape)}; they must match (one value per token). Fix the collator or the examples."
            )
        if not whole_shape and shape[0] != ref_shape[0]:
            raise ValueError(
                f"The data collator returned inconsistent shapes: '{key}' has {shape[0]} rows but '{reference}' has "
                f"{ref_shape[0]}; every field needs one row per example. Fix the collator or the examples."
            )


def _check_array(name: str, value: Any) -> None:
    """Fails early, naming the field, on batch arrays no backend can take (instead of an error deep inside one)."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return
    if dtype == np.object_:
        raise ValueError(
            f"Feature '{name}' could not be batched into a numeric array (its values have different types or shapes, "
            "or contain None): make every example hold numbers or equal-shape arrays there, or pass a `data_collator`."
        )


def check_token_ids(batch: Mapping[str, Any]) -> None:
    """Fails early, naming the field, on float token ids fed to a model that looks them up in an embedding
    (called only for such models: a model may take a float `input_ids` of its own)."""
    for name, value in batch.items():
        dtype = getattr(value, "dtype", None)
        if name.endswith("input_ids") and dtype is not None and np.issubdtype(dtype, np.floating):
            raise ValueError(
                f"Feature '{name}' has dtype {dtype}, but token ids must be integers (embedding lookups take int "
                f"indices): cast them, e.g. dataset.map(lambda ex: {{'{name}': [int(t) for t in ex['{name}']]}}), or "
                "build them with a tokenizer."
            )


class RemoveColumnsCollator:
    """Drops example fields the model does not accept before collating (remove_unused_columns)."""

    def __init__(self, collator: Callable, keep: Iterable[str]):
        self.collator = collator
        self.keep = set(keep)

    def __call__(self, features: list[Mapping[str, Any]]):
        if features and isinstance(features[0], Mapping):
            self._check_inputs_survive(features[0])
            features = [{k: v for k, v in f.items() if k in self.keep} for f in features]
        return self.collator(features)

    def _check_inputs_survive(self, example: Mapping[str, Any]) -> None:
        # Only labels left means the model would be called without any input: name the dropped fields.
        kept = [k for k in example if k in self.keep]
        dropped = sorted(k for k in example if k not in self.keep)
        if dropped and all("label" in k for k in kept):
            inputs = sorted(k for k in self.keep if "label" not in k)
            raise ValueError(
                f"The examples' fields {dropped} are not arguments of the model's forward (it takes {inputs[:8]}), so "
                "remove_unused_columns drops them and the model would get no input. Rename the fields to the model's "
                "argument names (e.g. 'input_ids'), or set remove_unused_columns=False."
            )


# ---------------------------------------------------------------------------------------------
# Batch plans
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """How one dataset is cut into per-process micro-batches.

    Attributes:
        batch_size: per-process micro-batch size.
        num_processes / process_index: this process's place among the data-parallel processes.
        drop_last: drop the last incomplete global batch.
    """

    batch_size: int
    num_processes: int = 1
    process_index: int = 0
    drop_last: bool = False

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_processes

    def num_batches(self, num_examples: int) -> int:
        """Micro-batches in one pass over num_examples."""
        if self.drop_last:
            return num_examples // self.global_batch_size
        return math.ceil(num_examples / self.global_batch_size)

    def local_indices(self, order: np.ndarray, batch_number: int) -> np.ndarray:
        """This process's indices of global batch `batch_number` of an epoch order.

        The last global batch of a multi-process epoch is filled up by wrapping around to the start
        of the order, so every process gets a batch of the same size (each process must run the same
        number of collective steps).
        """
        start = batch_number * self.global_batch_size
        stop = start + self.global_batch_size
        indices = order[start:stop]
        if len(indices) < self.global_batch_size and self.num_processes > 1:
            wrap = np.resize(order, self.global_batch_size - len(indices))
            indices = np.concatenate([indices, wrap])
        lo = self.process_index * self.batch_size
        return indices[lo : lo + self.batch_size]


def iterate_map_batches(
    dataset: Any,
    order: np.ndarray,
    plan: BatchPlan,
    collate: Callable[[list], Any],
    start_batch: int = 0,
) -> Iterator[Batch]:
    """Yields this process's collated numpy batches of one pass, from `start_batch` on."""
    for number in range(start_batch, plan.num_batches(len(order))):
        indices = plan.local_indices(order, number)
        if len(indices) == 0:
            return
        yield batch_to_numpy(collate(fetch_examples(dataset, indices)))


def iterate_stream_batches(
    dataset: Iterable, plan: BatchPlan, collate: Callable[[list], Any], skip_batches: int = 0
) -> Iterator[Batch]:
    """Yields this process's batches from a stream (IterableDataset), skipping the first ones."""
    buffer: list = []
    number = 0
    for example in dataset:
        buffer.append(example)
        if len(buffer) == plan.global_batch_size:
            if number >= skip_batches:
                lo = plan.process_index * plan.batch_size
                yield batch_to_numpy(collate(buffer[lo : lo + plan.batch_size]))
            number += 1
            buffer = []
    # A partial last batch is kept only on one process: split over several, some processes would
    # get nothing and the others would wait forever in their collective ops.
    if buffer and not plan.drop_last and plan.num_processes == 1 and number >= skip_batches:
        yield batch_to_numpy(collate(buffer))


def batch_size_of(batch: Mapping[str, Any]) -> int | None:
    """Leading dimension of the first array in a batch."""
    for value in batch.values():
        shape = getattr(value, "shape", None)
        if shape:
            return int(shape[0])
    return None


def count_label_items(batches: Sequence[Mapping[str, Any]], shift_labels: bool) -> int | None:
    """Label tokens that contribute to the loss (labels != -100) across an accumulation window.

    This is HF's `num_items_in_batch`: the loss of every micro-batch is normalised by the token
    count of the whole window, so accumulating k micro-batches equals one k-times bigger batch.
    Causal-LM losses shift labels, so position 0 of each row never counts.
    """
    if not batches or "labels" not in batches[0]:
        return None
    total = 0
    for batch in batches:
        labels = batch.get("shift_labels")
        if labels is None:
            labels = batch["labels"]
            if shift_labels:
                labels = labels[..., 1:]
        labels = np.asarray(labels)
        total += int((labels != -100).sum())
    return total


def pad_and_concat(arrays: list[np.ndarray], padding_index: int = -100) -> np.ndarray:
    """Concatenates batches along dim 0, padding dim 1 with padding_index when lengths differ."""
    if len(arrays) == 1:
        return np.asarray(arrays[0])  # one batch is returned as it is (a scalar stays a scalar, as in HF)
    # Scalars (e.g. a loss among a tuple model output) are concatenated as one value per batch, as in HF.
    arrays = [np.atleast_1d(np.asarray(a)) for a in arrays]
    if len(arrays[0].shape) < 2 or all(a.shape[1:] == arrays[0].shape[1:] for a in arrays):
        return np.concatenate(arrays, axis=0)
    width = max(a.shape[1] for a in arrays)
    padded = []
    for a in arrays:
        out = np.full((a.shape[0], width) + a.shape[2:], padding_index, dtype=a.dtype)
        out[:, : a.shape[1]] = a
        padded.append(out)
    return np.concatenate(padded, axis=0)


def nested_concat(chunks: list[Any], padding_index: int = -100) -> Any:
    """pad_and_concat over (possibly nested) tuples/dicts of arrays, keeping the structure."""
    first = chunks[0]
    if isinstance(first, (list, tuple)):
        return type(first)(nested_concat([c[i] for c in chunks], padding_index) for i in range(len(first)))
    if isinstance(first, Mapping):
        return type(first)({k: nested_concat([c[k] for c in chunks], padding_index) for k in first})
    return pad_and_concat(chunks, padding_index)
