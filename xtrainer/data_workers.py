"""Making batches, in the training process or in worker processes: the loader's engine.

A batch is made from one `BatchTask` (which examples, or the examples themselves for a stream; its
epoch and number; its seed) by `BatchMaker`: fetch the examples, run the collator, convert to numpy.
Everything that decides *which* examples go into a batch runs in the training process (loaders.py),
so the batches are the same whatever the number of workers.

With `dataloader_num_workers > 0` the tasks are handed to `torch.utils.data.DataLoader` worker
processes (bench/RESULTS.md, "Input pipeline", says why this library and not Grain or torchdata's
StatefulDataLoader): they run the dataset's `__getitem__` and the collator; the training process
only receives finished batches, through shared memory.

Randomness: every batch is made under its own seed (derived from the run's seed, the epoch and the
batch number), set into Python's `random`, NumPy's global generator and torch's CPU generator
around the fetch and the collator. A random collator (MLM masking) or augmentation therefore gives
the same batch with 0, 1, 2 or 4 workers, before and after a resume. In the training process the
generators' previous states are put back afterwards, so making batches never moves the training
RNG (dropout). A collator with its own generator (transformers' `seed=`) keeps its own semantics.
"""

from __future__ import annotations

import functools
import logging
import random
import signal
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import data

logger = logging.getLogger(__name__)

#: The seed of the torch DataLoader's own generator (its per-worker base seeds). Fixed, so creating
#: an iterator never draws from the global torch RNG (which would shift dropout on the torch backend);
#: the batches do not depend on it, since each batch sets its own seed.
_LOADER_GENERATOR_SEED = 0x5EED


@dataclass(frozen=True)
class BatchTask:
    """One batch to make.

    Attributes:
        epoch / number: where the batch sits (its number within the epoch).
        seed: the seed its fetch and collator run under.
        indices: the dataset indices of a map-style dataset's batch.
        examples: the examples themselves, for a stream (read in the training process).
    """

    epoch: int
    number: int
    seed: int
    indices: Sequence[int] | None = None
    examples: list | None = None


def batch_seed(base_seed: int, split: str, epoch: int, number: int, process_index: int) -> int:
    """The seed of one batch: a pure function of where the batch is, so it survives resumes and worker counts."""
    split_code = {"train": 0, "eval": 1, "test": 2}.get(split, 3)
    words = [int(base_seed) % (2**32), split_code, int(epoch), int(number), int(process_index)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


@dataclass(frozen=True)
class WorkerOptions:
    """transformers' `dataloader_*` fields, as the loader uses them.

    Attributes:
        num_workers: worker processes (0: batches are made in the training process).
        prefetch_factor: batches each worker prepares ahead (torch's default, 2, when None).
        persistent_workers: keep the workers between epochs (and between evaluations).
        pin_memory: page-lock batches for asynchronous copies to a CUDA device.
        in_order: yield batches in order (False: as soon as one is ready; see loaders.py).
        multiprocessing_context: "fork", "spawn" or "forkserver" (None: the platform's default).
    """

    num_workers: int = 0
    prefetch_factor: int | None = None
    persistent_workers: bool = False
    pin_memory: bool = False
    in_order: bool = True
    multiprocessing_context: str | None = None

    @property
    def lookahead(self) -> int:
        """Batches the workers may have in flight ahead of the training thread."""
        if self.num_workers == 0:
            return 0
        return self.num_workers * (self.prefetch_factor or 2)


def options_from_args(args: Any, pins_host_memory: bool, backend_name: str = "") -> WorkerOptions:
    """WorkerOptions from TrainingArguments; `pins_host_memory`: whether the backend copies from pinned memory.

    `dataloader_pin_memory` (default True, as in transformers) acts only where pinning makes copies
    asynchronous, the torch backend on CUDA; elsewhere this says so once per process (at info level,
    since the value is the default): JAX and torch_xla stage host-to-device copies themselves.
    """
    if args.dataloader_pin_memory and not pins_host_memory and args.dataloader_num_workers > 0:
        _say_once(f"dataloader_pin_memory has no effect on backend {backend_name or '?'} (pinned host memory only "
                  "speeds up copies to a CUDA device on the torch backend; JAX and torch_xla stage their copies).")
    return WorkerOptions(
        num_workers=int(args.dataloader_num_workers or 0),
        prefetch_factor=args.dataloader_prefetch_factor,
        persistent_workers=bool(args.dataloader_persistent_workers) and args.dataloader_num_workers > 0,
        pin_memory=bool(args.dataloader_pin_memory) and pins_host_memory,
        in_order=bool(getattr(args, "dataloader_in_order", True)),
        multiprocessing_context=getattr(args, "dataloader_multiprocessing_context", None),
    )


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    logger.info(message)


# ---------------------------------------------------------------------------------------------
# Making one batch
# ---------------------------------------------------------------------------------------------


class _SeededGenerators:
    """Sets Python's, NumPy's and torch's CPU generators to one seed; optionally puts them back after."""

    def __init__(self, seed: int, restore: bool):
        self.seed, self.restore = seed, restore
        self.saved = None

    def __enter__(self):
        torch = sys.modules.get("torch")  # a collator that uses torch has imported it; never import it here
        if self.restore:
            self.saved = (random.getstate(), np.random.get_state(), torch.get_rng_state() if torch else None)
        random.seed(self.seed)
        np.random.seed(self.seed)
        if torch is not None:
            torch.default_generator.manual_seed(self.seed)  # the CPU generator only: CUDA's is the model's
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            py_state, np_state, torch_state = self.saved
            random.setstate(py_state)
            np.random.set_state(np_state)
            if torch_state is not None:
                sys.modules["torch"].set_rng_state(torch_state)
        return False


class BatchMaker:
    """Turns a BatchTask into `(number, numpy batch)`; picklable, so worker processes can run it.

    Args:
        dataset: the map-style dataset the indices point into (None for streams).
        collate: the collator (list of examples -> batch).
        in_worker: set in worker processes: the generators need not be restored there.
    """

    def __init__(self, dataset: Any, collate: Callable[[list], Any]):
        self.dataset = dataset
        self.collate = collate
        self.in_worker = False

    def __getitem__(self, task: BatchTask) -> tuple[int, dict[str, np.ndarray]]:
        return task.number, self.make(task)

    def make(self, task: BatchTask) -> dict[str, np.ndarray]:
        with _SeededGenerators(task.seed, restore=not self.in_worker):
            try:
                examples = task.examples if task.examples is not None else data.fetch_examples(self.dataset, task.indices)
                collated = self.collate(examples)
            except Exception as exc:
                _add_note(exc, self._describe_failure(task))
                raise
        try:
            return data.batch_to_numpy(collated)
        except (TypeError, ValueError) as exc:
            _add_note(exc, f"In batch {task.number} of epoch {task.epoch} ({_example_list(task)}), made by the data collator.")
            raise

    def _describe_failure(self, task: BatchTask) -> str:
        """Which example of a failed batch fails on its own (fetched and collated alone), if one does."""
        where = f"While making batch {task.number} of epoch {task.epoch} ({_example_list(task)})"
        if task.indices is None:
            return where + "."
        for index in task.indices:
            try:
                with _SeededGenerators(task.seed, restore=True):
                    self.collate(data.fetch_examples(self.dataset, [index]))
            except Exception as exc:  # noqa: BLE001 - this one is the culprit; its own error is described
                return f"{where}: example index {int(index)} fails on its own ({type(exc).__name__}: {exc})."
        return f"{where}: every example works on its own, so they fail only together (e.g. fields of different shapes)."


def _example_list(task: BatchTask) -> str:
    if task.indices is None:
        return f"{len(task.examples or [])} examples of the stream"
    shown = ", ".join(str(int(i)) for i in list(task.indices)[:8])
    more = ", ..." if len(task.indices) > 8 else ""
    return f"example indices [{shown}{more}]"


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):  # Python 3.11+: the note is printed with the exception, in workers too
        exc.add_note(note)


# ---------------------------------------------------------------------------------------------
# Running tasks
# ---------------------------------------------------------------------------------------------


def make_in_process(tasks: Iterable[BatchTask], maker: BatchMaker) -> Iterator[tuple[int, dict]]:
    """num_workers=0: each batch is made in the training thread when it is asked for (transformers' semantics)."""
    for task in tasks:
        yield task.number, maker.make(task)


class _TaskSource:
    """The DataLoader's sampler: the tasks of the current pass (set before each `iter()`)."""

    def __init__(self):
        self.tasks: Iterable[BatchTask] = ()

    def __iter__(self):
        return iter(self.tasks)


def _worker_init(worker_id: int) -> None:
    """In each worker: leave SIGINT/SIGTERM to the training process, which stops the workers itself.

    A Ctrl-C or a scheduler's SIGTERM reaches the whole process group; the training process then
    finishes its step, saves (SIGTERM) and shuts the workers down. A worker that died on the signal
    first would turn that clean stop into a 'worker exited unexpectedly' error. Should the training
    process die without stopping them (SIGKILL), torch's watchdog in each worker ends it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    info.dataset.in_worker = True


@dataclass
class WorkerPool:
    """A torch DataLoader over BatchTasks, kept between passes when workers persist.

    `run(tasks)` yields `(number, batch)` in task order (or, with in_order=False, as they finish).
    """

    maker: BatchMaker
    options: WorkerOptions
    _source: _TaskSource = field(default_factory=_TaskSource)
    _loader: Any = None
    _iterator: Any = None

    def _build(self):
        try:
            import torch.utils.data
        except ImportError as exc:  # pragma: no cover - torch is in both lanes
            raise ImportError(
                "dataloader_num_workers > 0 runs the workers with torch.utils.data.DataLoader: install torch "
                "(pip install 'xtrainer[torch]'), or set dataloader_num_workers=0."
            ) from exc
        opts = self.options
        return torch.utils.data.DataLoader(
            self.maker,  # map-style: __getitem__(task)
            batch_size=None,
            sampler=self._source,
            num_workers=opts.num_workers,
            collate_fn=torch.utils.data.default_convert,  # numpy -> tensors, which travel through shared memory
            pin_memory=opts.pin_memory,
            worker_init_fn=_worker_init,
            multiprocessing_context=opts.multiprocessing_context,
            generator=torch.Generator().manual_seed(_LOADER_GENERATOR_SEED),
            prefetch_factor=opts.prefetch_factor,
            persistent_workers=opts.persistent_workers,
            in_order=opts.in_order,
        )

    def run(self, tasks: Iterable[BatchTask]) -> Iterator[tuple[int, dict]]:
        if self._loader is None:
            self._loader = self._build()
        self._source.tasks = tasks
        with warnings.catch_warnings():
            # JAX warns at every fork that a forked child must not use JAX; the workers only run the
            # dataset and the collator (README, "Feeding the devices": use "spawn" if those use JAX).
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            iterator = iter(self._loader)  # persistent workers: the same processes, a new pass
        self._iterator = iterator
        try:
            while True:
                try:
                    number, batch = next(iterator)
                except StopIteration:
                    return
                except RuntimeError as exc:
                    _explain_worker_death(exc)
                    raise
                except (ConnectionError, EOFError) as exc:
                    # A worker died while the batch it had sent was being received (its shared memory is
                    # handed over by the worker itself): the same failure as above, seen earlier.
                    dead = [w.pid for w in getattr(iterator, "_workers", []) if not w.is_alive()]
                    error = RuntimeError(f"DataLoader worker (pid(s) {dead}) exited unexpectedly while handing over "
                                         f"a batch ({type(exc).__name__}: {exc}).")
                    _explain_worker_death(error)
                    raise error from exc
                yield int(number), {k: data.to_numpy(v) for k, v in batch.items()}
        finally:
            if not self.options.persistent_workers:
                self._stop(iterator)

    def close(self) -> None:
        """Stops the workers (persistent ones included)."""
        if self._iterator is not None:
            self._stop(self._iterator)
        self._iterator = None
        self._loader = None

    @staticmethod
    def _stop(iterator) -> None:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _explain_worker_death(exc: RuntimeError) -> None:
    message = str(exc)
    if "DataLoader worker" in message and ("exited unexpectedly" in message or "killed by signal" in message):
        _add_note(
            exc,
            "A data-loading worker process died without an error of its own: the OS killed it (often the "
            "out-of-memory killer: each worker holds its own copy of what the dataset and collator touch). "
            "Lower dataloader_num_workers or dataloader_prefetch_factor, or make the dataset lighter; "
            "resume_from_checkpoint=True continues from the last checkpoint.",
        )
