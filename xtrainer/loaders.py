"""Loaders: a dataset + collator + batch plan, iterated one epoch at a time as numpy batches.

The Trainer builds one `DatasetLoader` per dataset. It decides, in the training process, which
examples make up each batch (the front's sampler order, cut by the batch plan), and has the batches
made in place or by worker processes (data_workers.py); either way the batches are identical.

It also knows where it is: `state_dict(epoch, batches_done)` describes the position after the
first `batches_done` micro-batches of an epoch have been trained on (for a stream, the stream's own
state at that point), and `load_state_dict` makes the next `epoch()` continue from there, without
reading the batches before it when the dataset allows (data_state.py writes it into checkpoints).

Streams (IterableDatasets, generators) are read in the training process, in their own order, and
cut into batches there; the workers run the collator on them. So a stream gives the same batches
with any number of workers; what the workers take off the training thread is the collation.

Several processes: a map-style dataset is read only where needed (each process fetches its slice
of every global batch). A stream that is split into shards (a datasets IterableDataset whose
`n_shards` is a multiple of the process count) is split by shard: each process reads only its own
shards and makes its batches from them. Any other stream is read whole by every process, which
keeps its slice of each global batch (a warning says so once).
"""

from __future__ import annotations

import copy
import logging
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import data
from .data_workers import BatchMaker, BatchTask, WorkerOptions, WorkerPool, batch_seed, make_in_process

logger = logging.getLogger(__name__)

#: Stream states kept for batches made but not yet trained on (workers and device prefetch run ahead).
_STREAM_STATES_KEPT = 4096


class EpochSampler:
    """The index order of an epoch, as transformers scripts read it from `dataloader.sampler`."""

    def __init__(self, num_examples: int, order_fn: Callable[[int], np.ndarray] | None):
        self.num_examples, self.order_fn, self.epoch = num_examples, order_fn, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_examples

    def __iter__(self):
        if self.order_fn is None:
            return iter(range(self.num_examples))
        return iter(int(i) for i in self.order_fn(self.epoch))


class _Pass:
    """What one `epoch()` pass has handed out, to say where it stands after n batches were trained on."""

    def __init__(self, epoch: int, start: int, done_beyond: list[int], stream_state: Any = None):
        self.epoch, self.start = epoch, start  # start: the first batch number not trained on yet
        self.done_beyond = sorted(done_beyond)  # later batches trained on before a resume (in_order=False)
        self.already = start + len(self.done_beyond)  # batches of the epoch trained on before this pass
        self.yielded = array("q")
        self.num_batches: int | None = None  # known once the tasks ran out (the epoch's length, for a stream)
        self.stream_states: OrderedDict[int, Any] = OrderedDict()  # batches read -> stream state then
        if stream_state is not None:
            self.stream_states[start] = stream_state

    def record_stream_state(self, batches_read: int, state: Any) -> None:
        self.stream_states[batches_read] = state
        while len(self.stream_states) > _STREAM_STATES_KEPT:
            self.stream_states.popitem(last=False)

    def state(self, batches_done: int) -> dict:
        """The position once `batches_done` micro-batches of this epoch were trained on.

        `next_batch` is the first batch number not trained on; `done_beyond` the later ones that were
        (batches handed out as they were ready, in_order=False); with in-order batches it is empty.
        """
        taken = batches_done - self.already
        if taken < 0 or taken > len(self.yielded):
            raise ValueError(
                f"batches_done={batches_done} is outside this pass ({self.already} done before it, "
                f"{len(self.yielded)} batches handed out)"
            )
        done = set(self.done_beyond) | set(self.yielded[:taken])
        prefix = self.start
        while prefix in done:
            prefix += 1
        state = {"epoch": self.epoch, "batches_done": batches_done, "next_batch": prefix,
                 "done_beyond": sorted(n for n in done if n > prefix),
                 "epoch_complete": self.num_batches is not None and batches_done >= self.num_batches}
        if self.stream_states:
            if prefix not in self.stream_states:
                raise ValueError(f"the stream's state after {prefix} batches is no longer kept")
            state["stream_state"] = self.stream_states[prefix]
        return state


class DatasetLoader:
    """Per-process numpy batches of one dataset.

    Args:
        dataset: datasets.Dataset, torch Dataset / IterableDataset, a list of dicts, or any iterable.
        plan: how batches are cut and split over processes.
        collate: turns a list of examples into a batch.
        order_fn: epoch -> index order (map-style datasets); None means sequential.
        keep_columns: model argument names to keep (remove_unused_columns), or None to keep all.
        workers: worker processes and their settings (transformers' dataloader_* fields).
        seed: the base of every batch's seed (random collators, augmentation).
        split: "train", "eval" or "test" (batches of different splits get different seeds).

    Attributes read by transformers scripts and tests: `batch_size` (per process), `total_batch_size`
    (over processes), `dataset`, `sampler` (map-style), `collate_fn`, torch DataLoader's worker settings
    (`num_workers`, `prefetch_factor`, `persistent_workers`, `pin_memory`, `in_order`,
    `multiprocessing_context`), `drop_last`, and `len()` when the dataset has one.
    """

    def __init__(
        self,
        dataset: Any,
        plan: data.BatchPlan,
        collate: Callable[[list], Any],
        order_fn: Callable[[int], np.ndarray] | None = None,
        keep_columns: list[str] | None = None,
        *,
        workers: WorkerOptions | None = None,
        seed: int = 0,
        split: str = "train",
    ):
        self.plan = plan
        self.is_stream = not data.has_length(dataset)
        if keep_columns is not None:
            dataset, collate = _drop_unused_columns(dataset, collate, keep_columns)
        self.reads_own_shards = self.is_stream and _splits_by_shard(dataset, plan)
        if self.reads_own_shards:
            from datasets.distributed import split_dataset_by_node

            dataset = split_dataset_by_node(dataset, rank=plan.process_index, world_size=plan.num_processes)
        elif self.is_stream and plan.num_processes > 1:
            logger.warning(
                "Each of the %d processes reads the whole training stream and keeps its slice of every global batch. "
                "Give the stream a number of shards that is a multiple of the process count (e.g. "
                "Dataset.to_iterable_dataset(num_shards=...)) to have each process read only its own shards.",
                plan.num_processes)
        self.dataset = dataset
        self.collate = collate
        self.order_fn = order_fn
        self.workers = workers or WorkerOptions()
        self.seed, self.split = seed, split
        if not self.is_stream and len(dataset) == 0:
            raise ValueError("The dataset is empty: it has no examples to batch.")
        self.sampler = None if self.is_stream else EpochSampler(len(dataset), order_fn)
        self._maker = BatchMaker(None if self.is_stream else dataset, collate)
        self._pool: WorkerPool | None = None
        self._pass: _Pass | None = None
        self._resume: dict | None = None
        if self.is_stream and not self.workers.in_order:
            logger.warning("dataloader_in_order=False has no effect on a stream: its batches are cut in stream order, "
                           "so they are handed out in that order.")

    # ------------------------------------------------------------------ what transformers scripts read

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    @property
    def collate_fn(self) -> Callable:
        return self.collate

    @property
    def num_workers(self) -> int:
        return self.workers.num_workers

    @property
    def drop_last(self) -> bool:
        return self.plan.drop_last

    @property
    def total_batch_size(self) -> int:
        """Examples in one batch over every process (what accelerate's prepared loaders report)."""
        return self.plan.global_batch_size

    @property
    def prefetch_factor(self) -> int | None:
        """Batches each worker prepares ahead (None without workers, torch's default 2 when unset)."""
        return None if self.workers.num_workers == 0 else (self.workers.prefetch_factor or 2)

    @property
    def persistent_workers(self) -> bool:
        return self.workers.persistent_workers

    @property
    def pin_memory(self) -> bool:
        return self.workers.pin_memory

    @property
    def in_order(self) -> bool:
        return self.workers.in_order

    @property
    def multiprocessing_context(self):
        """The workers' multiprocessing context object (None: the platform's default), as torch's DataLoader has it."""
        name = self.workers.multiprocessing_context
        if name is None or self.workers.num_workers == 0:
            return None
        import multiprocessing

        return multiprocessing.get_context(name) if isinstance(name, str) else name

    @property
    def num_examples(self) -> int | None:
        return None if self.is_stream else len(self.dataset)

    def __len__(self) -> int:
        if self.is_stream:
            raise TypeError("A streaming dataset has no length.")
        return self.plan.num_batches(len(self.dataset))

    def has_length(self) -> bool:
        return not self.is_stream

    def __iter__(self):
        return self.epoch(0)

    # ------------------------------------------------------------------ batches

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This process's batches of one epoch, from batch `start_batch` on (or from a loaded state)."""
        resume, self._resume = self._resume, None
        if resume is not None and (resume["epoch"], resume["batches_done"]) != (epoch, start_batch):
            resume = None  # the loaded state was for another position (e.g. ignore_data_skip)
        done_beyond = list(resume.get("done_beyond", [])) if resume else []
        first = int(resume.get("next_batch", start_batch)) if resume else start_batch
        stream_state = resume.get("stream_state") if resume else None
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self._pass = _Pass(epoch, first, done_beyond, stream_state if self._stream_is_stateful() else None)
        if self.is_stream:
            tasks = self._stream_tasks(epoch, first, stream_state)
        else:
            tasks = self._map_tasks(epoch, first, set(done_beyond))
        return self._hand_out(tasks, self._pass)

    def _hand_out(self, tasks, current: _Pass):
        if self.workers.num_workers == 0:
            made = make_in_process(tasks, self._maker)
        else:
            if self._pool is None:
                self._pool = WorkerPool(self._maker, self.workers)
            made = self._pool.run(tasks)
        for number, batch in made:
            current.yielded.append(number)
            yield batch
        current.num_batches = current.already + len(current.yielded)

    def _task(self, epoch: int, number: int, **what) -> BatchTask:
        seed = batch_seed(self.seed, self.split, epoch, number, self.plan.process_index)
        return BatchTask(epoch=epoch, number=number, seed=seed, **what)

    def _map_tasks(self, epoch: int, start: int, skip: set[int]) -> Iterator[BatchTask]:
        n = len(self.dataset)
        order = self.order_fn(epoch) if self.order_fn is not None else np.arange(n, dtype=np.int64)
        for number in range(start, self.plan.num_batches(n)):
            if number in skip:
                continue
            indices = self.plan.local_indices(order, number)
            if len(indices) == 0:
                return
            yield self._task(epoch, number, indices=indices)

    def _stream_is_stateful(self) -> bool:
        return callable(getattr(self.dataset, "state_dict", None)) and callable(getattr(self.dataset, "load_state_dict", None))

    def _stream_tasks(self, epoch: int, start: int, stream_state: Any) -> Iterator[BatchTask]:
        """Reads the stream in the training process and cuts it into this process's batches."""
        stream, plan = self.dataset, self.plan
        if hasattr(stream, "set_epoch"):
            stream.set_epoch(epoch)
        stateful = self._stream_is_stateful()
        skip = start
        if stream_state is not None and stateful:
            stream.load_state_dict(copy.deepcopy(stream_state))
            skip = 0  # the state is the stream's position after `start` batches
        elif start:
            logger.info("Resuming the stream by reading and dropping its first %d batches (it has no "
                        "state_dict/load_state_dict to resume from).", start)
        number = start - skip
        buffer: list = []
        # Own shards: this process's batches are consecutive examples of its own stream.
        group = plan.batch_size if self.reads_own_shards else plan.global_batch_size
        lo = 0 if self.reads_own_shards else plan.process_index * plan.batch_size
        current = self._pass
        for example in stream:
            buffer.append(example)
            if len(buffer) < group:
                continue
            if number >= start:
                if stateful:
                    current.record_stream_state(number + 1, copy.deepcopy(stream.state_dict()))
                yield self._task(epoch, number, examples=buffer[lo : lo + plan.batch_size])
            number += 1
            buffer = []
        # A partial last batch is kept only on one process: split over several, some processes would
        # get nothing and the others would wait forever in their collective ops.
        if buffer and not plan.drop_last and plan.num_processes == 1 and number >= start:
            if stateful:
                current.record_stream_state(number + 1, copy.deepcopy(stream.state_dict()))
            yield self._task(epoch, number, examples=buffer)

    # ------------------------------------------------------------------ position

    def state_dict(self, epoch: int, batches_done: int) -> dict:
        """The position after `batches_done` micro-batches of `epoch` were trained on (JSON-able but for a
        stream's own state). Only positions of the current pass can be described."""
        current = self._pass
        if current is None or current.epoch != epoch:
            return {"epoch": epoch, "batches_done": batches_done, "next_batch": batches_done, "done_beyond": []}
        return current.state(batches_done)

    def load_state_dict(self, state: dict) -> tuple[int, int]:
        """Makes the next epoch() call continue at `state`; returns (epoch, batches_done) to pass to it."""
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if state.get("epoch_complete") or (not self.is_stream and done >= len(self)):
            self._resume = None
            return epoch + 1, 0
        self._resume = dict(state)
        return epoch, done

    def close(self) -> None:
        """Stops worker processes kept between epochs (persistent_workers)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _splits_by_shard(dataset: Any, plan: data.BatchPlan) -> bool:
    shards = getattr(dataset, "n_shards", None) or getattr(dataset, "num_shards", None)
    return plan.num_processes > 1 and isinstance(shards, int) and shards > 0 and shards % plan.num_processes == 0 and \
        type(dataset).__module__.startswith("datasets")


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
