"""Cross-field checks of TrainingArguments: each failure names the argument and the fix."""

from __future__ import annotations

import logging
import os

from .nan_policy import check_policy
from .trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType

BACKENDS = ("auto", "jax", "torch", "torch_xla")
LOG_LEVELS = {
    "detail": logging.DEBUG,  # transformers' name for debug with file names and line numbers
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "passive": -1,
}


def validate(args) -> None:
    """Raises ValueError for inconsistent or out-of-range TrainingArguments."""
    def fail(msg):
        raise ValueError(msg)

    if args.backend not in BACKENDS:
        fail(f"`backend`={args.backend!r} is not supported; choose one of: {', '.join(BACKENDS)}.")
    problem = check_policy(getattr(args, "nan_policy", "ignore"))
    if problem:
        fail(problem)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            fail(f"`{name}` must be >= 1, got {getattr(args, name)}.")
    if args.eval_accumulation_steps is not None and args.eval_accumulation_steps < 1:
        fail(f"`eval_accumulation_steps` must be >= 1 or None, got {args.eval_accumulation_steps}.")
    if args.max_steps < -1 or args.max_steps != int(args.max_steps):
        fail(f"`max_steps` must be a non-negative integer or -1 (use num_train_epochs), got {args.max_steps}.")
    if args.num_train_epochs < 0:
        fail(f"`num_train_epochs` must be >= 0, got {args.num_train_epochs}.")
    if args.warmup_steps < 0:
        fail(f"`warmup_steps` must be >= 0 (a float < 1 is a ratio), got {args.warmup_steps}.")
    if args.eval_delay < 0:
        fail(f"`eval_delay` must be >= 0, got {args.eval_delay}.")
    if args.save_total_limit is not None and args.save_total_limit < 0:
        fail(f"`save_total_limit` must be >= 0 or None, got {args.save_total_limit}.")
    if args.logging_strategy == IntervalStrategy.STEPS and args.logging_steps == 0:
        fail("logging_strategy='steps' requires a non-zero `logging_steps`.")
    for name, strategy in (
        ("logging_steps", args.logging_strategy),
        ("eval_steps", args.eval_strategy),
        ("save_steps", args.save_strategy),
    ):
        value = getattr(args, name)
        if value is None:
            continue
        if value < 0:
            fail(f"`{name}` must be >= 0 (a float in (0, 1) is a ratio of the total steps), got {value}.")
        if strategy == "steps" and value > 1:
            if value != int(value):
                fail(f"`{name}` must be an integer when larger than 1, got {value}.")
            setattr(args, name, int(value))

    if args.load_best_model_at_end and args.save_strategy != SaveStrategy.BEST:
        if args.save_strategy == SaveStrategy.NO:
            fail("`load_best_model_at_end` needs checkpoints: set `save_strategy` to 'steps', 'epoch' or 'best'.")
        if args.eval_strategy != args.save_strategy:
            fail(
                "`load_best_model_at_end` requires `eval_strategy` and `save_strategy` to match (or "
                f"save_strategy='best'); got eval_strategy={args.eval_strategy.value!r}, "
                f"save_strategy={args.save_strategy.value!r}."
            )
        if args.eval_strategy == IntervalStrategy.STEPS:
            save, ev = args.save_steps, args.eval_steps
            if (save < 1) != (ev < 1):
                fail(
                    "`load_best_model_at_end` cannot guarantee `save_steps` is a multiple of `eval_steps` when "
                    f"one is a ratio and the other absolute (save_steps={save}, eval_steps={ev})."
                )
            if round(save * 1_000_000) % round(ev * 1_000_000) != 0:
                fail(
                    "`load_best_model_at_end` requires `save_steps` to be a multiple of `eval_steps`; got "
                    f"save_steps={save}, eval_steps={ev}."
                )
    if args.save_strategy == SaveStrategy.BEST:
        if args.metric_for_best_model is None:
            fail("`args.metric_for_best_model` must be provided when save_strategy='best': set `metric_for_best_model` "
                 "(or load_best_model_at_end=True, which ranks by the loss).")
        if args.eval_strategy == IntervalStrategy.NO:
            fail("save_strategy='best' needs evaluations: set `eval_strategy` to 'steps' or 'epoch'.")
    metric_driven = (SchedulerType.REDUCE_ON_PLATEAU, SchedulerType.GREEDY)
    if args.lr_scheduler_type in metric_driven and args.eval_strategy == IntervalStrategy.NO:
        fail(f"lr_scheduler_type='{args.lr_scheduler_type.value}' requires an `eval_strategy` other than 'no'.")

    if args.fp16 and args.bf16:
        fail("`fp16` and `bf16` cannot both be True; pick one.")
    if args.fp16_full_eval and args.bf16_full_eval:
        fail("`fp16_full_eval` and `bf16_full_eval` cannot both be True; pick one.")
    if args.include_num_input_tokens_seen not in ("all", "non_padding", "no"):
        fail(
            "`include_num_input_tokens_seen` must be 'all', 'non_padding', 'no' or a bool, "
            f"got {args.include_num_input_tokens_seen!r}."
        )
    for name in ("log_level", "log_level_replica"):
        if getattr(args, name) not in LOG_LEVELS:
            fail(f"`{name}`={getattr(args, name)!r} is not valid; choose one of: {', '.join(LOG_LEVELS)}.")
    if args.dataloader_num_workers < 0:
        fail(f"`dataloader_num_workers` must be >= 0, got {args.dataloader_num_workers}.")
    if args.dataloader_num_workers == 0 and args.dataloader_prefetch_factor is not None:
        fail("`dataloader_prefetch_factor` needs `dataloader_num_workers` > 0.")
    bad = sorted(set(args.include_for_metrics) - {"inputs", "loss"})
    if bad:
        fail(f"`include_for_metrics` accepts 'inputs' and 'loss', got {bad}.")


def check_eval_dataset(args, eval_dataset) -> None:
    """Raises ValueError when an evaluation strategy is set but no eval_dataset was given (as HF does)."""
    strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
    if strategy != IntervalStrategy.NO.value and eval_dataset is None:
        raise ValueError(
            f"eval_strategy={strategy!r} evaluates during training, but no `eval_dataset` was passed to Trainer: "
            "pass an eval_dataset, or set eval_strategy='no'."
        )


def check_output_dir(output_dir: str) -> None:
    """Fails before training when output_dir is a file or cannot be written (instead of at the first save).

    Raises:
        NotADirectoryError: output_dir exists and is a file.
        PermissionError: output_dir (or, when it does not exist yet, its nearest existing parent) is not writable.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise NotADirectoryError(f"output_dir={output_dir!r} exists and is a file; choose a directory path.")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == os.path.abspath(output_dir) else f" (its parent {existing!r} is not)"
        raise PermissionError(
            f"output_dir={output_dir!r} is not writable{where}: checkpoints and the model could not be saved there. "
            "Fix its permissions, or choose a writable output_dir."
        )
