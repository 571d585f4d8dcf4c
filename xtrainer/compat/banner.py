"""The "***** Running training *****" summary transformers logs at the start of train() (at log_level=info)."""

from __future__ import annotations

import logging

logger = logging.getLogger("xtrainer.trainer")


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
