"""Where this process stands in the run, as `TrainingArguments` reports it to scripts.

transformers' example scripts read `training_args.device`, `n_gpu`, `world_size`, `process_index`,
`local_process_index`, `parallel_mode`, `should_log`/`should_save` and wrap dataset preprocessing in
`main_process_first()`. Here each of them asks the backend that runs (or, before a Trainer exists,
the one `backend` names; "auto" guesses as the Trainer would for a torch model):

| backend   | processes from                          | device                                 | barrier               |
| --------- | --------------------------------------- | -------------------------------------- | --------------------- |
| torch     | torch.distributed / RANK, WORLD_SIZE    | cuda:LOCAL_RANK, or cpu                | torch.distributed     |
| jax       | jax.process_count() / process_index()   | torch's cpu: the backend moves weights | sync_global_devices   |
| torch_xla | torch_xla.runtime                       | the XLA device                         | xm.rendezvous         |

On the jax backend `model.to(training_args.device)` therefore keeps a torch model on the host,
which is where the backend reads its weights from (torchax); a Flax model has no `.to`.

Differences from transformers, on purpose: the torch backend drives one device per process, so
`n_gpu` is at most 1 (transformers would wrap several GPUs of one process in DataParallel); on
jax, `n_gpu` counts the GPUs this process drives, and `should_save` is process 0's alone, since
every host writes its shards of one checkpoint together (see `save_on_each_node` in
docs/training_arguments.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .args_types import ParallelMode

logger = logging.getLogger(__name__)

#: transformers' log level names; "passive" leaves the level as the application set it.
LOG_LEVELS = {
    "detail": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "passive": -1,
}


@dataclass(frozen=True)
class ProcessLayout:
    """This process's place in the run."""

    backend: str
    world_size: int = 1
    process_index: int = 0
    local_process_index: int = 0


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def run_backend(args) -> str:
    """The backend the process properties describe: the Trainer's, else `args.backend` ("auto" guessed)."""
    name = getattr(args, "_run_backend", None) or str(getattr(args, "backend", "auto") or "auto")
    if name != "auto":
        return name
    if not _importable("torch"):
        return "jax"
    from .backends.registry import detect_accelerator

    if detect_accelerator() == "tpu" and _importable("torch_xla"):
        return "torch_xla"
    return "torch"


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def layout(args) -> ProcessLayout:
    """Reads this process's world size and indices from the backend's runtime (see the module docstring)."""
    backend = run_backend(args)
    if backend == "jax":
        import jax

        return ProcessLayout("jax", jax.process_count(), jax.process_index(), _env_int("LOCAL_RANK", default=0))
    if backend == "torch_xla":
        import torch_xla.runtime as xr

        return ProcessLayout("torch_xla", xr.process_count(), xr.process_index(), _env_int("LOCAL_RANK", default=0))
    import torch.distributed as dist

    # `local_rank` is what old torch launchers passed on the command line; LOCAL_RANK wins when both exist.
    local_default = args.local_rank if getattr(args, "local_rank", -1) not in (None, -1) else 0

    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = _env_int("WORLD_SIZE", default=1), _env_int("RANK", default=0)
    return ProcessLayout("torch", world, rank, _env_int("LOCAL_RANK", default=local_default))


def _cuda_usable(args) -> bool:
    if getattr(args, "use_cpu", False):
        return False
    import torch

    return torch.cuda.is_available()


def device(args) -> Any:
    """The torch device of this process (see the module docstring for jax)."""
    backend = run_backend(args)
    if backend == "torch_xla":
        import torch_xla.core.xla_model as xm

        return xm.xla_device()
    if backend == "jax":
        if not _importable("torch"):
            return "cpu"
        import torch

        return torch.device("cpu")
    import torch

    if _cuda_usable(args):
        return torch.device("cuda", layout(args).local_process_index)
    return torch.device("cpu")


def n_gpu(args) -> int:
    """GPUs this process drives (0 on CPU and TPU)."""
    backend = run_backend(args)
    if backend == "torch_xla":
        return 0
    if backend == "jax":
        if getattr(args, "use_cpu", False):
            return 0
        import jax

        return sum(d.platform == "gpu" for d in jax.local_devices())
    return 1 if _cuda_usable(args) else 0


def parallel_mode(args) -> ParallelMode:
    backend = run_backend(args)
    if backend == "torch_xla":
        return ParallelMode.TPU
    if backend == "jax":
        import jax

        if jax.default_backend() == "tpu":
            return ParallelMode.TPU
    if layout(args).world_size > 1:
        return ParallelMode.DISTRIBUTED
    if n_gpu(args) > 1:
        return ParallelMode.NOT_DISTRIBUTED
    return ParallelMode.NOT_PARALLEL


def should_log(args) -> bool:
    """Whether this process logs at `log_level` (each node's first process, or only the run's first)."""
    where = layout(args)
    return (where.local_process_index if args.log_on_each_node else where.process_index) == 0


def should_save(args) -> bool:
    """Whether this process writes files (each node's first process with save_on_each_node, else process 0).

    JAX checkpoints are written by every host together into one directory, so there process 0
    alone writes the front's files whatever save_on_each_node says (it warns that it does nothing).
    """
    where = layout(args)
    per_node = args.save_on_each_node and where.backend != "jax"
    return (where.local_process_index if per_node else where.process_index) == 0


def process_log_level(args) -> int:
    """`log_level` on processes where should_log, else `log_level_replica`; "passive" is xtrainer's current level."""
    level = LOG_LEVELS[args.log_level if should_log(args) else args.log_level_replica]
    return logging.getLogger("xtrainer").getEffectiveLevel() if level == -1 else level


def barrier(args, desc: str) -> None:
    """Waits until every process of the run reaches the barrier named `desc`."""
    backend = run_backend(args)
    if backend == "jax":
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"xtrainer: {desc}")
    elif backend == "torch_xla":
        import torch_xla.core.xla_model as xm

        xm.rendezvous(desc)
    else:
        import torch.distributed as dist

        from .backends.torch import distributed

        if not dist.is_initialized():  # scripts call main_process_first before any Trainer joins the group
            distributed.init_from_env(args)
        dist.barrier()


@contextlib.contextmanager
def main_process_first(args, local: bool = True, desc: str = "work") -> Iterator[None]:
    """Runs the block on the main process first, then on the others (a real barrier across processes).

    Args:
        local: the first process of each node goes first (node-local storage); False: only the run's
            first process does (storage every node shares).
        desc: names the work in debug logs and in the barrier.
    """
    where = layout(args)
    if where.world_size <= 1:
        yield
        return
    is_main = (where.local_process_index if local else where.process_index) == 0
    if not is_main:
        logger.debug("process %d waits for the main process to do %s", where.process_index, desc)
        barrier(args, desc)
    try:
        yield
    finally:
        if is_main:
            logger.debug("process %d did %s; releasing the others", where.process_index, desc)
            barrier(args, desc)


class ProcessPropertiesMixin:
    """The process and batch properties of TrainingArguments (what transformers' scripts read)."""

    @property
    def device(self):
        """The torch device this process trains on (torch's cpu on the jax backend; see args_process)."""
        return device(self)

    @property
    def n_gpu(self) -> int:
        """GPUs this process drives (0 on CPU and TPU; at most 1 on the torch backend)."""
        return n_gpu(self)

    @property
    def parallel_mode(self) -> ParallelMode:
        """not_parallel, not_distributed, distributed or tpu (as transformers reports it)."""
        return parallel_mode(self)

    @property
    def world_size(self) -> int:
        """Number of processes in the run."""
        return layout(self).world_size

    @property
    def process_index(self) -> int:
        """This process's index among all processes."""
        return layout(self).process_index

    @property
    def local_process_index(self) -> int:
        """This process's index on its node."""
        return layout(self).local_process_index

    @property
    def should_log(self) -> bool:
        return should_log(self)

    @property
    def should_save(self) -> bool:
        return should_save(self)

    @property
    def train_batch_size(self) -> int:
        """per_device_train_batch_size x max(1, n_gpu): the batch this process steps on, as transformers counts it."""
        return self.per_device_train_batch_size * max(1, self.n_gpu)

    @property
    def eval_batch_size(self) -> int:
        """per_device_eval_batch_size x max(1, n_gpu)."""
        return self.per_device_eval_batch_size * max(1, self.n_gpu)

    @property
    def place_model_on_device(self) -> bool | None:
        """None, as in transformers: the backend places the model (subclasses may override)."""
        return None

    @property
    def ddp_timeout_delta(self):
        """ddp_timeout as a datetime.timedelta (what torch.distributed takes)."""
        import datetime

        return datetime.timedelta(seconds=self.ddp_timeout)

    def get_process_log_level(self) -> int:
        """The log level this process uses: log_level where should_log, else log_level_replica."""
        return process_log_level(self)

    def main_process_first(self, local: bool = True, desc: str = "work"):
        """Context manager: the main process runs the block first, the others wait, then run it.

        Example:
            >>> with training_args.main_process_first(desc="tokenising"):
            ...     dataset = dataset.map(tokenize, batched=True)
        """
        return main_process_first(self, local=local, desc=desc)


__all__ = ["LOG_LEVELS", "ProcessLayout", "ProcessPropertiesMixin", "layout", "main_process_first", "run_backend"]
