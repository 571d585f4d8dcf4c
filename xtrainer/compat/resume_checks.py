"""On resume: warn where the run's arguments differ from those the checkpoint was trained with (intervals and
batch size), as transformers does, since a different batch size or interval silently changes the run."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def mismatched_arguments(args, state, batch_devices: int) -> list[str]:
    """Lines "name: value (from args) != value (from trainer_state.json)" for each mismatch."""
    lines = []
    for name in ("logging_steps", "eval_steps", "save_steps"):
        ours, theirs = getattr(args, name, None), getattr(state, name, None)
        if ours is not None and theirs is not None and ours != theirs:
            lines.append(f"{name}: {ours} (from args) != {theirs} (from trainer_state.json)")
    saved = getattr(state, "train_batch_size", None)
    if saved:
        per_device = saved // max(1, batch_devices)
        if per_device != args.per_device_train_batch_size:
            lines.append(f"per_device_train_batch_size: {args.per_device_train_batch_size} (from args) != "
                         f"{per_device} (from trainer_state.json)")
    return lines


def warn_on_mismatched_arguments(args, state, batch_devices: int) -> None:
    lines = mismatched_arguments(args, state, batch_devices)
    if lines:
        logger.warning("The following arguments do not match the ones in the `trainer_state.json` within the checkpoint "
                       "directory: \n\t" + "\n\t".join(lines))
