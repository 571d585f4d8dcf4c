"""`Trainer.plan`: the plan of the train step this Trainer's train() would run on a TPU preset."""

from __future__ import annotations

import copy
import logging
from typing import Any

from .planner import batch_signature, causal_lm_batch, largest_fitting_batch, plan

logger = logging.getLogger(__name__)


def plan_for_trainer(trainer, tpu_config: str | None = None, *, seq_len: int | None = None,
                     output_dir: str | None = None, find_batch_size: bool = False, **kwargs: Any):
    """Plans `trainer`'s model, arguments, loss and optimizer on a TPU preset (see planning.planner.plan).

    The batch takes its columns, dtypes and row shape from the first training batch when the Trainer
    has a train_dataset and `seq_len` is not given; else it is a causal-LM batch of `seq_len` tokens.
    find_batch_size: plan the largest per_device_train_batch_size whose step fits (several compiles).
    """
    batch = kwargs.pop("batch", None)
    if batch is None:
        batch = _first_batch_signature(trainer) if seq_len is None else causal_lm_batch(seq_len)
    # A JAX Trainer's own hooks, so that an overridden compute_loss is what is compiled; another backend's
    # Trainer is planned with the default hooks (its overrides are torch code for that backend).
    hooks = trainer.hooks if trainer.backend.name == "jax" else None
    if hooks is None and trainer.hooks.overrides("compute_loss"):
        logger.warning("Trainer.plan: this Trainer's compute_loss override is written for backend=%r; the plan "
                       "compiles the default loss on the jax backend.", trainer.backend.name)
    common = dict(batch=batch, seq_len=seq_len, compute_loss_func=trainer.compute_loss_func,
                  optimizers=(trainer.optimizer, trainer.lr_scheduler) if hooks is not None else (None, None),
                  hooks=hooks, **kwargs)
    args = trainer.args
    if find_batch_size:
        def make(size):
            trial = copy.copy(args)
            trial.per_device_train_batch_size = size
            return plan(trainer.model, trial, tpu_config, output_dir="", **common)

        size, _ = largest_fitting_batch(make, args.per_device_train_batch_size)
        args = copy.copy(args)
        args.per_device_train_batch_size = max(size, 1)
        logger.info("Largest per_device_train_batch_size whose step fits: %s", size)
    return plan(trainer.model, args, tpu_config, output_dir=output_dir, **common)


def _first_batch_signature(trainer):
    if trainer.train_dataset is None:
        return None
    try:
        loader = trainer.get_train_dataloader()
        first = next(iter(loader.epoch(0, 0)))
    except (StopIteration, ValueError, TypeError) as exc:
        logger.warning("Could not read a training batch to plan with (%s); planning a causal-LM batch.", exc)
        return None
    return batch_signature(first)
