"""Writing checkpoint-N for the Trainer: every process's part, their agreement on the outcome, and the
atomic publication; in the step loop, or in the background with `async_checkpointing=True`.

One save of step N (every process runs it; "exchange" is the backend's all-gather of small host
values, which works from a background thread and never touches the accelerator):

1. Process 0 creates tmp-checkpoint-N/ and the processes agree that it exists.
2. Each process hands its state to the backend and process 0 writes the front's files
   (trainer_state.json, training_args.bin). With `save_async` the backend copies the state to host
   memory here and writes the files later; this is all the step loop pays for an asynchronous save.
3. The writes finish.
4. The processes exchange their outcomes. If any failed, process 0 removes tmp-checkpoint-N/ and
   every process raises the same error, naming the process and the file that failed
   (CheckpointDiskFullError for a full disk, else CheckpointWriteError); earlier checkpoints stay.
5. Process 0 writes the manifest as the last file and renames the directory to checkpoint-N/; the
   processes agree on that too; process 0 then rotates old checkpoints.

Asynchronous saves run steps 3-5 in one background thread. At most one save is in flight: the
next save, the end of training, a preemption, and an exception leaving train() wait for it first,
and its error (the same on every process) is raised there. `on_save` fires when the save is
handed off; a checkpoint is visible as checkpoint-N/ only once complete and verified, exactly as
for a synchronous save, so a kill -9 at any moment never leaves a loadable partial checkpoint.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from . import checkpoint as ckpt

logger = logging.getLogger(__name__)


class _InFlight:
    """The background thread finishing one asynchronous save, and its outcome."""

    def __init__(self, step: int, job: Callable[[], None]):
        self.step = step
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(job,), name=f"xtrainer-checkpoint-{step}", daemon=True)
        self.thread.start()

    def _run(self, job) -> None:
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - handed to the step loop by CheckpointWriter.wait
            self.error = exc


class CheckpointWriter:
    """Saves checkpoints of one Trainer (see the module docstring).

    Args:
        backend: the Trainer's backend (save / save_async, exchange, process_index).
        run_dir: the output directory.
        asynchronous: finish saves in a background thread (TrainingArguments.async_checkpointing).
    """

    def __init__(self, backend: Any, run_dir: str, *, asynchronous: bool = False):
        self.backend = backend
        self.run_dir = run_dir
        self.asynchronous = asynchronous and callable(getattr(backend, "save_async", None))
        self._in_flight: _InFlight | None = None
        self._count = 0  # saves so far: equal on every process, it names each save's exchanges

    @property
    def is_main(self) -> bool:
        """Whether this process owns the checkpoint directory (prepares, completes, publishes and rotates it):
        process 0, or on a backend that writes a checkpoint per node (torch with save_on_each_node) the first
        process of each node, into that node's own output_dir."""
        return bool(getattr(self.backend, "writes_checkpoint_files", self.backend.process_index == 0))

    # ------------------------------------------------------------------ the protocol

    def _exchange(self, tag: str, value) -> list:
        exchange = getattr(self.backend, "exchange", None)
        if self.backend.num_processes > 1 and callable(exchange):
            return exchange(tag, value)
        if self.backend.num_processes > 1:  # a backend without exchange: the old barrier, local outcome
            self.backend.barrier()
        return [value]

    def _agree(self, tag: str, step: int, failure: dict | None, cause: BaseException | None) -> None:
        """Every process learns every process's failure; all raise the same error if there is one."""
        failures = [f for f in self._exchange(tag, failure) if f is not None]
        if not failures:
            return
        if self.is_main:
            ckpt.discard_temporary(self.run_dir, step)
        error = ckpt.save_failure_error(step, self.run_dir, failures)
        raise error from cause

    def _describe(self, exc: BaseException) -> dict:
        return ckpt.describe_save_failure(exc, rank=self.backend.process_index)

    def save(self, step: int, state: Any, *, save_only_model: bool, write_front_files: Callable[[str], None],
             write_model_files: Callable[[str], None] | None = None, model_files_in_background: bool = False,
             after_publish: Callable[[], None] | None = None,
             write_process_files: Callable[[str], None] | None = None) -> None:
        """Saves checkpoint `step` (collective: every process calls it, in the same order).

        Args:
            step: the global step.
            state: the backend's train state.
            save_only_model: TrainingArguments.save_only_model.
            write_front_files: writes trainer_state.json etc. into the temporary directory (process 0).
            write_model_files: writes the model files (the Trainer's `_save`) on the processes that write them;
                in the step loop, or with the rest of an asynchronous save when model_files_in_background.
            after_publish: runs on process 0 once the checkpoint is published (rotation).
            write_process_files: writes this process's own small files (its data position) into the
                temporary directory, on every process, in the step loop (they describe this moment).

        Raises:
            CheckpointDiskFullError / CheckpointWriteError: this save (when synchronous) or the
            previous asynchronous one failed on some process; the same error on every process.
        """
        self.wait()
        self._count += 1
        tag = f"save-{self._count}"
        failure = cause = None
        if self.is_main:
            try:
                if self._count == 1:  # what crashed saves of earlier runs left behind
                    ckpt.remove_stale_temporaries(self.run_dir)
                ckpt.prepare_temporary(self.run_dir, step)
            except Exception as exc:  # noqa: BLE001 - reported to every process below
                failure, cause = self._describe(exc), exc
        self._agree(f"{tag}/prepared", step, failure, cause)
        if self._count > 1 and callable(getattr(self.backend, "forget", None)):
            self.backend.forget(f"save-{self._count - 1}")  # every process is past that save now
        tmp = ckpt.temporary_dir(self.run_dir, step)
        finish, failure, cause = None, None, None
        try:
            save_async = getattr(self.backend, "save_async", None)
            # save_async for a save that finishes later, and for the processes of a multi-process run,
            # whose writes then watch each other's outcome (outcome_tag); `save` otherwise.
            if callable(save_async) and (self.asynchronous or self.backend.num_processes > 1):
                finish = save_async(state, tmp, save_only_model=save_only_model, outcome_tag=f"{tag}/written",
                                    background=self.asynchronous)
            else:
                self.backend.save(state, tmp, save_only_model=save_only_model)
            if write_process_files is not None:
                write_process_files(tmp)
            if self.is_main:
                write_front_files(tmp)
            if write_model_files is not None and not model_files_in_background:
                write_model_files(tmp)
        except Exception as exc:  # noqa: BLE001 - reported to every process in _complete
            failure, cause = self._describe(exc), exc
        if write_model_files is not None and model_files_in_background:
            finish = _then(lambda: write_model_files(tmp), finish)

        def complete() -> None:
            self._complete(step, tag, finish, failure, cause, after_publish)

        if self.asynchronous and failure is None:
            self._in_flight = _InFlight(step, complete)
        else:
            complete()

    def _complete(self, step, tag, finish, failure, cause, after_publish) -> None:
        """Steps 3-5: wait for the writes, agree on the outcome, publish (in the background if async)."""
        if finish is not None:  # even after a failure here: no write may outlive the save
            try:
                finish()
            except Exception as exc:  # noqa: BLE001
                if failure is None:
                    failure, cause = self._describe(exc), exc
        self._agree(f"{tag}/written", step, failure, cause)
        failure = cause = None
        if self.is_main:
            try:
                ckpt.publish_temporary(self.run_dir, step)
            except Exception as exc:  # noqa: BLE001
                failure, cause = self._describe(exc), exc
        self._agree(f"{tag}/published", step, failure, cause)
        if self.is_main and after_publish is not None:
            after_publish()

    # ------------------------------------------------------------------ waiting

    def wait(self) -> None:
        """Waits for the asynchronous save in flight; raises its error (the same on every process)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return
        in_flight.thread.join()
        if in_flight.error is not None:
            raise in_flight.error

    def settle_after_error(self) -> None:
        """train() is ending with an exception: let the save in flight finish, and log (not raise) its error,
        so the original exception is the one reported."""
        try:
            self.wait()
        except BaseException as exc:  # noqa: BLE001
            logger.error("The asynchronous checkpoint save in flight failed as well: %s", exc)


def _then(first: Callable[[], None], then: Callable[[], None] | None) -> Callable[[], None]:
    def both() -> None:
        first()
        if then is not None:
            then()

    return both


def writer_for(trainer) -> CheckpointWriter:
    """The Trainer's CheckpointWriter, made on first use (one per Trainer, kept across train() calls)."""
    wanted = bool(getattr(trainer.args, "async_checkpointing", False))
    writer = trainer.__dict__.get("_checkpoint_writer")
    if writer is None or writer.run_dir != trainer.args.output_dir:
        if writer is not None:
            writer.wait()
        writer = CheckpointWriter(trainer.backend, trainer.args.output_dir, asynchronous=wanted)
        if wanted and not writer.asynchronous:
            logger.warning("async_checkpointing=True does nothing on backend=%r: its checkpoints are written in the "
                           "step loop.", trainer.backend.name)
        trainer._checkpoint_writer = writer
    writer.asynchronous = wanted and callable(getattr(trainer.backend, "save_async", None))
    return writer


def existing_writer(trainer) -> CheckpointWriter | None:
    return trainer.__dict__.get("_checkpoint_writer")


__all__ = ["CheckpointWriter", "existing_writer", "writer_for"]
