"""Loaders: a dataset + collator + batch plan, iterated one epoch at a time as numpy batches.

The Trainer builds one `DatasetLoader` per dataset; it hides whether the dataset is map-style or a
stream, applies remove_unused_columns, and knows its length in batches (for progress bars and step
counts) when the dataset has one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import data


class DatasetLoader:
    """Per-process numpy batches of one dataset.

    Args:
        dataset: datasets.Dataset, torch Dataset / IterableDataset, a list of dicts, or any iterable.
        plan: how batches are cut and split over processes.
        collate: turns a list of examples into a batch.
        order_fn: epoch -> index order (map-style datasets); None means sequential.
        keep_columns: model argument names to keep (remove_unused_columns), or None to keep all.
    """

    def __init__(
        self,
        dataset: Any,
        plan: data.BatchPlan,
        collate: Callable[[list], Any],
        order_fn: Callable[[int], np.ndarray] | None = None,
        keep_columns: list[str] | None = None,
    ):
        self.plan = plan
        self.is_stream = not data.has_length(dataset)
        if keep_columns is not None:
            dataset, collate = _drop_unused_columns(dataset, collate, keep_columns)
        self.dataset = dataset
        self.collate = collate
        self.order_fn = order_fn
        if not self.is_stream and len(dataset) == 0:
            raise ValueError("The dataset is empty: it has no examples to batch.")

    @property
    def num_examples(self) -> int | None:
        return None if self.is_stream else len(self.dataset)

    def __len__(self) -> int:
        if self.is_stream:
            raise TypeError("A streaming dataset has no length.")
        return self.plan.num_batches(len(self.dataset))

    def has_length(self) -> bool:
        return not self.is_stream

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This process's batches of one epoch, starting at batch `start_batch` (for mid-epoch resume)."""
        if self.is_stream:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            return data.iterate_stream_batches(self.dataset, self.plan, self.collate, skip_batches=start_batch)
        n = len(self.dataset)
        order = self.order_fn(epoch) if self.order_fn is not None else np.arange(n, dtype=np.int64)
        return data.iterate_map_batches(self.dataset, order, self.plan, self.collate, start_batch=start_batch)

    def __iter__(self):
        return self.epoch(0)


def _drop_unused_columns(dataset: Any, collate: Callable, keep: list[str]):
    """remove_unused_columns: datasets.Dataset loses the columns; other datasets get a filtering collator."""
    columns = data.dataset_columns(dataset)
    keep_set = set(keep)
    if columns is not None and hasattr(dataset, "remove_columns"):
        unused = [c for c in columns if c not in keep_set]
        if unused and len(unused) == len(columns):
            raise ValueError(
                f"No dataset column matches the model's forward arguments ({', '.join(sorted(keep_set))}); "
                f"the columns are {columns}. Rename the columns or set remove_unused_columns=False."
            )
        return (dataset.remove_columns(unused) if unused else dataset), collate
    return dataset, data.RemoveColumnsCollator(collate, keep_set)
