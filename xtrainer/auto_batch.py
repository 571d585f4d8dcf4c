"""auto_find_batch_size: retry training with a smaller per-device batch after an out-of-memory error.

As in transformers (whose Trainer wraps its inner loop in accelerate's `find_executable_batch_size`),
the training loop restarts from the beginning with a smaller `per_device_train_batch_size` when a
step runs out of device memory, until one fits or the batch reaches zero. What counts as out of
memory, and how much smaller the next try is, depends on the backend:

- torch: `torch.OutOfMemoryError` (CUDA, ROCm) and the messages accelerate treats as out of memory
  (CPU allocator, MPS, cuDNN); the next batch is int(0.9 x batch), accelerate's rule.
- torch_xla: XLA's RESOURCE_EXHAUSTED (compile or run); the next batch is int(0.9 x batch).
- jax: the step is compiled before it runs, so the backend checks the compiled step against device
  memory and, when it does not fit, compiles smaller batches (without running them) to find the
  largest that fits: the next try uses that one (planning/fit.py). A RESOURCE_EXHAUSTED while a step
  runs falls back to int(0.9 x batch).

The found batch is kept in `trainer._train_batch_size` (transformers' attribute, which the loop reads)
and in trainer_state.json's train_batch_size; `args` is left as the user wrote it. Resuming from a
checkpoint with auto_find_batch_size starts from the checkpoint's batch size, as transformers does.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# Messages accelerate's should_reduce_batch_size treats as out-of-memory (single-argument RuntimeErrors).
_TORCH_OOM_MESSAGES = (
    " out of memory.",
    "MPS backend out of memory",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",
    "DefaultCPUAllocator: can't allocate memory",
    "FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception from a training step means the device ran out of memory."""
    from .planning.memory import StepDoesNotFit, is_resource_exhausted

    if isinstance(exc, StepDoesNotFit):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    if isinstance(exc, RuntimeError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        if any(message in exc.args[0] for message in _TORCH_OOM_MESSAGES):
            return True
    return type(exc).__name__ in ("XlaRuntimeError", "JaxRuntimeError", "RuntimeError") and is_resource_exhausted(exc)


def next_batch_size(exc: BaseException, current: int) -> int:
    """The per-device batch to try after this out-of-memory error."""
    largest = getattr(exc, "largest_batch", None)
    if largest:
        return min(int(largest), current - 1)
    return int(current * 0.9)


def train_with_batch_search(trainer, run: Callable[[], Any], resume_dir: str | None) -> Any:
    """Runs `run()` (the training loop), restarting it with a smaller batch after out-of-memory errors."""
    args = trainer.args
    if not args.auto_find_batch_size:
        trainer._train_batch_size = args.per_device_train_batch_size
        return run()
    _resume_batch_size(trainer, resume_dir)
    while True:
        if trainer._train_batch_size <= 0:
            raise RuntimeError("No executable batch size found, reached zero.")
        try:
            return run()
        except Exception as exc:  # noqa: BLE001 - anything that is not out-of-memory is re-raised as it is
            if not is_out_of_memory(exc):
                raise
            current = trainer._train_batch_size
            smaller = next_batch_size(exc, current)
            _release_memory(trainer)
            logger.warning(
                "auto_find_batch_size: per_device_train_batch_size=%s ran out of device memory (%s); restarting "
                "training with %s.", current, str(exc).splitlines()[0][:200], smaller)
            trainer._train_batch_size = smaller


def _resume_batch_size(trainer, resume_dir: str | None) -> None:
    """Resuming with auto_find_batch_size starts from the batch size the checkpoint was trained with."""
    if not resume_dir:
        return
    from .checkpoint import TRAINER_STATE_NAME

    path = os.path.join(resume_dir, TRAINER_STATE_NAME)
    try:
        with open(path) as handle:
            saved = json.load(handle).get("train_batch_size")
    except (OSError, ValueError):
        return
    devices = max(1, trainer.backend.local_batch_devices)
    if saved and saved // devices >= 1:
        trainer._train_batch_size = saved // devices


def _lift_again(backend) -> bool:
    """A torch module (through torchax) still holds its weights as torch tensors: the next attempt starts from
    them (donation consumed only their jax copies). A Flax model's arrays were the donated ones: False."""
    read = getattr(backend.adapter, "read_params", None)
    if backend.adapter.kind != "torchax" or read is None:
        return False
    backend.adapter.params, backend.adapter.extra = read()
    backend._place_params()
    return True


def _release_memory(trainer) -> None:
    """Drops the failed attempt's device state so the next attempt has the memory (accelerate's release_memory)."""
    backend = trainer.backend
    params = getattr(backend, "params", None)
    if params is not None:  # JAX: a step that failed while running has consumed its donated state
        import jax

        if any(getattr(leaf, "is_deleted", lambda: False)() for leaf in jax.tree.leaves(params)) and not _lift_again(backend):
            raise RuntimeError(
                "auto_find_batch_size: a train step ran out of memory after the weights were donated to it, so "
                "training cannot restart from them. Restart the run with a smaller per_device_train_batch_size.")
    trainer._backend_state = None
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
