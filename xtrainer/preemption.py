"""SIGTERM / preemption: finish the current step, save a checkpoint of it, and exit with code 143;
and, for every way train() can stop, no save left half-done and no process left waiting.

During `Trainer.train()` a SIGTERM handler is installed (main thread only; the previous handler
is restored when train() returns or raises). The handler only sets a host flag: a signal can
arrive in the middle of anything, so the work happens at a safe point, after an optimizer step.
There the loop asks the backend `preemption_requested(step, flag)`, a host-only check (no device
sync). When it says stop:

1. an asynchronous save still in flight is completed, then a checkpoint of that step is written
   (synchronously), even if save_strategy would not save now (unless this step was just saved),
   and `on_save` fires as for any save;
2. "received SIGTERM at step N; saved checkpoint-N; resume with resume_from_checkpoint=True" is
   logged as a warning;
3. `TrainingPreempted` is raised. It is a `SystemExit` with code 143 (128 + SIGTERM, what a
   process killed by SIGTERM reports), so an ordinary training script stops without a traceback
   and the scheduler sees a preempted job, while code that wants to handle it can catch it.

After the last step the backend is asked once more (`final=True`), so a SIGTERM that arrives
during the last step also ends with a checkpoint and 143.

Several processes must stop at the same step, or they would wait for each other in the save:

- torch (DDP / FSDP under torchrun): the processes agree through a non-blocking all-reduce (MAX)
  of the flag on a gloo group of their own, launched at the end of each step and read at the end
  of the next one (backends/torch/coordination.py). A SIGTERM to any one rank at step N makes
  every rank save step N+1 (N+2 if it arrives after that step's reduction was launched).
- multi-host JAX: JAX's preemption service (enabled where xtrainer starts jax.distributed) agrees
  on one step for every host; the backend answers with
  `jax.experimental.multihost_utils.reached_preemption_sync_point(step)`, so all hosts save the
  same step. JAX's own SIGTERM notifier looks for the signal only once a second, so xtrainer's
  handler posts the notice to the service itself (`announce_preemption`) the moment it runs.

`guard_train` wraps the whole loop: on any exception it lets an asynchronous save in flight finish
(its error is logged, the original one raised), and on several processes it turns the failure of a
collective whose peer died into a `PeerProcessFailure` (peer_failure.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

from .checkpoint_writer import existing_writer, writer_for
from .peer_failure import is_peer_failure, peer_failure_error

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
        self._announce = None

    def _on_sigterm(self, signum, frame) -> None:
        # Only a flag: the signal can interrupt anything (even a save), so the work waits for the loop.
        # Where the processes agree through a service (multi-host JAX), it hears of it at once.
        first = not self.requested
        self.requested = True
        if first and self._announce is not None:
            try:
                self._announce()
            except Exception as exc:  # noqa: BLE001 - the flag is set; the service may be gone already
                logger.warning("Could not announce the preemption to the other processes: %s", exc)

    def install(self, backend) -> None:
        """Makes this watcher the SIGTERM handler (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            logger.info("train() runs outside the main thread: SIGTERM is not intercepted (no preemption save).")
            return
        announce = getattr(backend, "announce_preemption", None)
        self._announce = announce if callable(announce) and getattr(backend, "native_preemption_notice", False) else None
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self.installed = True

    def uninstall(self) -> None:
        """Restores the SIGTERM handler that was there before install()."""
        if self.installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self.installed = False


@contextlib.contextmanager
def watch_sigterm(backend) -> Iterator[PreemptionWatcher]:
    """Intercepts SIGTERM for the duration of the block (one train() call)."""
    watcher = PreemptionWatcher()
    watcher.install(backend)
    try:
        yield watcher
    finally:
        watcher.uninstall()


@contextlib.contextmanager
def guard_train(trainer) -> Iterator[PreemptionWatcher | None]:
    """The block around one train() loop: SIGTERM flag (with args.enable_jit_checkpoint, transformers' switch
    for this save; otherwise SIGTERM keeps its usual effect), pending saves, dead peers (module docstring)."""
    intercept = bool(getattr(trainer.args, "enable_jit_checkpoint", False))
    with (watch_sigterm(trainer.backend) if intercept else contextlib.nullcontext()) as watcher:
        try:
            yield watcher
        except BaseException as exc:
            writer = existing_writer(trainer)
            if writer is not None:
                writer.settle_after_error()
            backend = trainer.backend
            if isinstance(exc, Exception) and backend.num_processes > 1 and is_peer_failure(exc):
                raise peer_failure_error(exc, rank=backend.process_index, processes=backend.num_processes,
                                         step=trainer.state.global_step, output_dir=trainer.args.output_dir) from exc
            raise


def _requested(backend, step: int, flag: bool, final: bool) -> bool:
    ask = getattr(backend, "preemption_requested", None)
    if not callable(ask):
        return flag
    return bool(ask(step, flag, final=True)) if final else bool(ask(step, flag))


def stop_if_preempted(trainer, *, final: bool = False) -> None:
    """After an optimizer step: on a preemption request, save this step and raise TrainingPreempted.

    Host-only: reads the watcher's flag (several processes: the agreement on it). `final=True`
    after the last step.
    """
    watcher = getattr(trainer, "_preemption", None)
    if watcher is None:
        return
    step = trainer.state.global_step
    if not _requested(trainer.backend, step, watcher.requested, final):
        return
    from .checkpoint import checkpoint_dir_name

    name = checkpoint_dir_name(step)
    path = os.path.join(trainer.args.output_dir, name)
    writer = existing_writer(trainer)
    if writer is not None:
        writer.wait()  # an asynchronous save in flight (perhaps of this very step) completes first
    if getattr(trainer, "_last_saved_step", None) != step or not os.path.isdir(path):
        trainer._save_checkpoint()
        trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
        writer_for(trainer).wait()  # published before the process exits
    message = f"Received SIGTERM at step {step}; saved {name} ({path}); resume with resume_from_checkpoint=True."
    logger.warning(message)
    raise TrainingPreempted(message, step=step, checkpoint=path)


def at_loop_end(trainer) -> None:
    """After the last step: a SIGTERM during it still saves and exits 143; an asynchronous save in
    flight is completed (its error raised) before training finishes."""
    stop_if_preempted(trainer, final=True)
    writer = existing_writer(trainer)
    if writer is not None:
        writer.wait()


__all__ = [
    "PREEMPTION_EXIT_CODE",
    "PreemptionWatcher",
    "TrainingPreempted",
    "at_loop_end",
    "guard_train",
    "stop_if_preempted",
    "watch_sigterm",
]
