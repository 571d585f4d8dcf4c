"""The "***** Running training *****" summary transformers logs at the start of train(), and the "***** Running
Evaluation *****" / "Prediction" one at the start of each evaluation loop (at log_level=info).

Like transformers' library logger, the "xtrainer" logger prints on stderr while the application has configured
no logging of its own (`install_default_handler`), so `log_level="info"` alone shows the banners; once the
application configures logging (logging.basicConfig, its own handler on "xtrainer"), its handlers print them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

logger = logging.getLogger("xtrainer.trainer")


class _DefaultHandler(logging.StreamHandler):
    """Prints xtrainer's records only while nobody else would: no handler on the root logger and none added to
    the "xtrainer" logger by the application. Like logging's last-resort handler, it writes to whatever
    sys.stderr is when a record comes (a redirected or captured stderr included)."""

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
    """Adds the fallback stderr handler to the "xtrainer" logger, once (see the module docstring)."""
    library_logger = logging.getLogger("xtrainer")
    if not any(isinstance(h, _DefaultHandler) for h in library_logger.handlers):
        library_logger.addHandler(_DefaultHandler())


def log_training_banner(trainer, num_examples: int, num_epochs: int, updates_per_epoch: int, total_batch_size: int,
                        max_steps: int, resumed_epochs: int | None, skipped_batches: int) -> None:
    args = trainer.args
    lines = [
        "***** Running training *****",
        f"  Num examples = {num_examples:,}",
        f"  Num Epochs = {num_epochs:,}",
        f"  Num update steps per epoch = {updates_per_epoch:,}",
        f"  Instantaneous batch size per device = {args.per_device_train_batch_size:,}",
        f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size:,}",
        f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}",
        f"  Total optimization steps = {max_steps:,}",
        f"  Number of trainable parameters = {trainer.get_num_trainable_parameters():,}",
        f"  Backend = {trainer.backend.name}",
    ]
    if resumed_epochs is not None:
        lines.append(f"  Resuming training from checkpoint with epoch {resumed_epochs} and global step "
                     f"{trainer.state.global_step}")
        if not args.ignore_data_skip:
            lines.append(f"  Fast-forwarding the data past {resumed_epochs} epochs and {skipped_batches} batches to "
                         "resume from the exact training state.")
    for line in lines:
        logger.info(line)


def log_evaluation_banner(trainer: Any, loader: Any, description: str, batch_size: int) -> None:
    """transformers' evaluation / prediction banner (`description` is "Evaluation" or "Prediction")."""
    if not logger.isEnabledFor(logging.INFO):
        return
    logger.info(f"***** Running {description} *****")
    try:
        logger.info(f"  Num examples = {trainer.num_examples(loader):,}")
    except (TypeError, NotImplementedError):  # an iterable without a length
        logger.info("  Num examples: Unknown")
    logger.info(f"  Batch size = {batch_size:,}")
