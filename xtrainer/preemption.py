"""SIGTERM / preemption: finish the current step, save a checkpoint of it, and exit with code 143.

This is transformers' `enable_jit_checkpoint`: it runs only when that argument is True (it is off by
default, as in transformers; then SIGTERM stops the process as usual). During `Trainer.train()` a
SIGTERM handler is installed (main thread only; the previous handler
is restored when train() returns or raises). The handler only sets a host flag: a signal can
arrive in the middle of anything, so the work happens at a safe point, after an optimizer step.
There the loop asks the backend `preemption_requested(step, flag)`, a host-only check (no device
sync). When it says stop:

1. a checkpoint of that step is written, even if save_strategy would not save now (unless this
   step was just saved), and `on_save` fires as for any save;
2. "received SIGTERM at step N; saved checkpoint-N; resume with resume_from_checkpoint=True" is
   logged as a warning;
3. `TrainingPreempted` is raised. It is a `SystemExit` with code 143 (128 + SIGTERM, what a
   process killed by SIGTERM reports), so an ordinary training script stops without a traceback
   and the scheduler sees a preempted job, while code that wants to handle it can catch it.

Multi-host JAX: the SIGTERM goes to JAX's preemption service (enabled where xtrainer starts
jax.distributed), which agrees on one step for every host; the backend then answers with
`jax.experimental.multihost_utils.reached_preemption_sync_point(step)`, so all hosts save the
same step. xtrainer leaves SIGTERM to JAX there (`native_preemption_notice`): a Python handler
would replace JAX's. Torch / torch_xla answer with the local flag, so a multi-process torch job
relies on the scheduler signalling every rank before the same step ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)

PREEMPTION_EXIT_CODE = 128 + signal.SIGTERM  # 143: what the scheduler sees for a SIGTERM-ed job


class TrainingPreempted(SystemExit):
    """Training stopped on SIGTERM after saving a checkpoint; exits the process with code 143.

    Attributes:
        step: the global step that was saved.
        checkpoint: the checkpoint directory written for it.
    """

    def __init__(self, message: str, *, step: int, checkpoint: str):
        super().__init__(PREEMPTION_EXIT_CODE)
        self.message, self.step, self.checkpoint = message, step, checkpoint

    def __str__(self) -> str:
        return self.message


class PreemptionWatcher:
    """The host flag a SIGTERM sets during one train() call.

    Attributes:
        requested: set by the signal handler; read by the loop after each optimizer step.
        installed: whether this watcher's handler is the process's SIGTERM handler.
    """

    def __init__(self) -> None:
        self.requested = False
        self.installed = False
        self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        # Only a flag: the signal can interrupt anything (even a save), so the work waits for the loop.
        self.requested = True

    def install(self, backend) -> None:
        """Makes this watcher the SIGTERM handler, unless this thread cannot or the backend owns SIGTERM."""
        if threading.current_thread() is not threading.main_thread():
            logger.info("train() runs outside the main thread: SIGTERM is not intercepted (no preemption save).")
            return
        if getattr(backend, "native_preemption_notice", False):
            logger.info("SIGTERM is handled by the backend's preemption service (multi-host sync point).")
            return
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self.installed = True

    def uninstall(self) -> None:
        """Restores the SIGTERM handler that was there before install()."""
        if self.installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self.installed = False


@contextlib.contextmanager
def watch_sigterm(backend, enabled: bool = True) -> Iterator[PreemptionWatcher | None]:
    """Intercepts SIGTERM for the duration of the block (one train() call).

    With `enabled` False (TrainingArguments.enable_jit_checkpoint, off by default as in transformers)
    SIGTERM keeps its usual meaning and the block gets None.
    """
    if not enabled:
        yield None
        return
    watcher = PreemptionWatcher()
    watcher.install(backend)
    try:
        yield watcher
    finally:
        watcher.uninstall()


def _requested(backend, step: int, flag: bool) -> bool:
    ask = getattr(backend, "preemption_requested", None)
    return bool(ask(step, flag)) if callable(ask) else flag


def stop_if_preempted(trainer) -> None:
    """After an optimizer step: on a preemption request, save this step and raise TrainingPreempted.

    Host-only: reads the watcher's flag (and, multi-host JAX, the preemption sync point).
    """
    watcher = getattr(trainer, "_preemption", None)
    if watcher is None:
        return
    step = trainer.state.global_step
    if not _requested(trainer.backend, step, watcher.requested):
        return
    from .checkpoint import checkpoint_dir_name

    name = checkpoint_dir_name(step)
    path = os.path.join(trainer.args.output_dir, name)
    if getattr(trainer, "_last_saved_step", None) != step or not os.path.isdir(path):
        trainer._save_checkpoint()
        trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
    message = f"Received SIGTERM at step {step}; saved {name} ({path}); resume with resume_from_checkpoint=True."
    logger.warning(message)
    raise TrainingPreempted(message, step=step, checkpoint=path)


__all__ = ["PREEMPTION_EXIT_CODE", "PreemptionWatcher", "TrainingPreempted", "stop_if_preempted", "watch_sigterm"]
