"""What transformers' Trainer tells the user through Python logging when a run starts.

- `log_training_start`: the "***** Running training *****" banner (examples, epochs, batch sizes,
  accumulation, total optimization steps, trainable parameters) and, on resume, where it resumes.
- `log_evaluation_start`: the "***** Running Evaluation *****" / "Prediction" banner.
- `warn_if_arguments_changed`: on resume, one warning listing the arguments whose values differ from the
  ones recorded in the checkpoint's trainer_state.json (logging/eval/save steps, per-device batch size),
  as transformers' compare_trainer_and_checkpoint_args does.

All go to the "xtrainer" loggers at INFO (the warning at WARNING), so they show with
`TrainingArguments(log_level="info")`. Like transformers' library logger, the "xtrainer" logger prints
on stderr when the application configured no logging of its own (`install_default_handler`); once the
application configures logging (e.g. logging.basicConfig), its handlers print xtrainer's records instead.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

logger = logging.getLogger("xtrainer.trainer")


class _DefaultHandler(logging.StreamHandler):
    """Prints xtrainer's records only while nobody else would: no handler on the root logger and none
    added to the "xtrainer" logger by the application. Like logging's last-resort handler, it writes to
    whatever sys.stderr is when a record comes (a redirected or captured stderr included)."""

    def __init__(self):
        super().__init__()
        self._fixed_stream = None

    @property
    def stream(self):
        return self._fixed_stream if self._fixed_stream is not None else sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ / setStream assign it
        self._fixed_stream = value

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        if any(h is not self for h in logging.getLogger("xtrainer").handlers):
            return
        super().emit(record)


def install_default_handler() -> None:
    """Adds the fallback stderr handler to the "xtrainer" logger once (see the module docstring)."""
    library_logger = logging.getLogger("xtrainer")
    if not any(isinstance(h, _DefaultHandler) for h in library_logger.handlers):
        library_logger.addHandler(_DefaultHandler())


def _has_length(loader: Any) -> bool:
    known = getattr(loader, "has_length", None)
    if callable(known):
        return bool(known())
    try:
        len(loader)
    except (TypeError, NotImplementedError):
        return False
    return True


def log_training_start(trainer: Any, *, num_examples: int, num_epochs: int, updates_per_epoch: int,
                       total_train_batch_size: int, max_steps: int, trainable_parameters: int | None,
                       resumed: bool = False, epochs_trained: int = 0, batches_skipped: int = 0) -> None:
    """The training banner (transformers' lines, plus the backend)."""
    args = trainer.args
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {num_examples:,}")
    logger.info(f"  Num Epochs = {num_epochs:,}")
    logger.info(f"  Num update steps per epoch = {updates_per_epoch:,}")
    logger.info(f"  Instantaneous batch size per device = {args.per_device_train_batch_size:,}")
    per_process = trainer._train_batch_size * trainer.backend.local_batch_devices
    if per_process != args.per_device_train_batch_size:
        logger.info(f"  Batch size per process (over its {trainer.backend.local_batch_devices} batch devices) = "
                    f"{per_process:,}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_train_batch_size:,}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {max_steps:,}")
    if trainable_parameters is not None:
        logger.info(f"  Number of trainable parameters = {trainable_parameters:,}")
    logger.info(f"  Backend = {trainer.backend.name}")
    if resumed:
        logger.info(f"  Resuming training from checkpoint with epoch {epochs_trained} and global step "
                    f"{trainer.state.global_step}")
        if not args.ignore_data_skip:
            logger.info(f"  Fast-forwarding the dataloader past {epochs_trained} epochs and {batches_skipped} "
                        "batches to resume from the exact training state.")


def log_evaluation_start(trainer: Any, loader: Any, description: str, batch_size: int) -> None:
    """transformers' evaluation / prediction banner."""
    logger.info(f"\n***** Running {description} *****")
    if _has_length(loader):
        logger.info(f"  Num examples = {trainer.num_examples(loader)}")
    else:
        logger.info("  Num examples: Unknown")
    logger.info(f"  Batch size = {batch_size}")


def warn_if_arguments_changed(args: Any, current: Any, saved: Any, batch_devices: int) -> list[str]:
    """Warns (once, one message) where this run's arguments differ from the checkpoint's trainer state.

    Args:
        args: this run's TrainingArguments.
        current: the TrainerState this run would start with (its steps computed from `args`).
        saved: the TrainerState read from the checkpoint.
        batch_devices: devices a process splits its batch over (the state records per-process batches).

    Returns:
        The mismatch lines (empty when everything matches).
    """
    lines = []
    for name in ("logging_steps", "eval_steps", "save_steps"):
        ours, theirs = getattr(current, name, None), getattr(saved, name, None)
        if ours is not None and theirs is not None and ours != theirs:
            lines.append(f"{name}: {ours} (from args) != {theirs} (from trainer_state.json)")
    saved_batch = getattr(saved, "train_batch_size", None)
    if saved_batch:
        saved_per_device = saved_batch // max(1, batch_devices)
        if saved_per_device != args.per_device_train_batch_size:
            lines.append(f"per_device_train_batch_size: {args.per_device_train_batch_size} (from args) != "
                         f"{saved_per_device} (from trainer_state.json)")
    if lines:
        logger.warning("The following arguments do not match the ones in the `trainer_state.json` within the "
                       "checkpoint directory:\n\t" + "\n\t".join(lines))
    return lines


__all__ = ["install_default_handler", "log_evaluation_start", "log_training_start", "warn_if_arguments_changed"]
