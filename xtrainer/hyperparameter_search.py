"""`Trainer.hyperparameter_search` with the optuna backend, on every xtrainer backend.

Each trial is one `trainer.train(trial=trial)`: the model comes from `model_init` (re-created for
each trial), the trial's hyperparameters are set on a copy of the training arguments (the user's
arguments object is never changed), and checkpoints go to `output_dir/run-<trial number>` (or
`output_dir/<hp_name(trial)>`). The objective is the last evaluation during training, or one
`evaluate()` after it when none ran, passed through `compute_objective` (default: eval_loss, or
the sum of the other metrics when there are any), as in transformers. Evaluations during training
are reported to optuna, so its pruners can stop a trial early.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from enum import Enum
from typing import Any, NamedTuple

from .callbacks import TrainerCallback
from .extras import require

logger = logging.getLogger(__name__)


class HPSearchBackend(str, Enum):
    """Hyperparameter-search libraries (transformers' enum); xtrainer runs optuna."""

    OPTUNA = "optuna"
    RAY = "ray"
    WANDB = "wandb"


class SearchBackendInfo(NamedTuple):
    """What a search library needs and whether xtrainer drives it."""

    name: str
    pip_package: str
    supported: bool


# transformers keys its backend registry by the enum, in the enum's order; scripts list it.
ALL_HYPERPARAMETER_SEARCH_BACKENDS = {
    HPSearchBackend.OPTUNA: SearchBackendInfo("optuna", "optuna", True),
    HPSearchBackend.RAY: SearchBackendInfo("ray", "'ray[tune]'", False),
    HPSearchBackend.WANDB: SearchBackendInfo("wandb", "wandb", False),
}

SUPPORTED_BACKENDS = tuple(b for b, info in ALL_HYPERPARAMETER_SEARCH_BACKENDS.items() if info.supported)


class BestRun(NamedTuple):
    """The best trial: its id (the optuna trial number, as a string), objective value(s), hyperparameters."""

    run_id: str
    objective: float | list[float]
    hyperparameters: dict[str, Any]
    run_summary: Any = None


def default_hp_space_optuna(trial) -> dict[str, Any]:
    """transformers' default search space: learning rate, epochs, seed and batch size."""
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
        "num_train_epochs": trial.suggest_int("num_train_epochs", 1, 5),
        "seed": trial.suggest_int("seed", 1, 40),
        "per_device_train_batch_size": trial.suggest_categorical("per_device_train_batch_size", [4, 8, 16, 32, 64]),
    }


def default_compute_objective(metrics: dict[str, float]) -> float:
    """eval_loss when it is the only metric, else the sum of the other metrics (timings left out)."""
    metrics = dict(metrics)
    loss = metrics.pop("eval_loss", None)
    metrics.pop("epoch", None)
    for key in [k for k in metrics if k.endswith(("_runtime", "_per_second", "_model_preparation_time"))]:
        metrics.pop(key)
    return loss if not metrics else sum(metrics.values())


def _resolve_backend(backend) -> HPSearchBackend:
    if backend is None:
        require("optuna", "optuna", "hyperparameter_search")
        return HPSearchBackend.OPTUNA
    try:
        backend = HPSearchBackend(getattr(backend, "value", backend))
    except ValueError as exc:
        names = ", ".join(repr(b.value) for b in HPSearchBackend)
        raise ValueError(f"Unknown hyperparameter-search backend {backend!r}; choose from {names}.") from exc
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(f"hyperparameter_search backend {backend.value!r} is not supported by xtrainer; use 'optuna'.")
    return backend


def trial_args(base_args, params: dict[str, Any], output_dir: str):
    """A copy of base_args with the trial's hyperparameters set (cast to each field's current type)."""
    args = copy.copy(base_args)
    for key, value in params.items():
        if not hasattr(args, key):
            logger.warning("Hyperparameter %r is not a TrainingArguments field; it is ignored.", key)
            continue
        current = getattr(args, key)
        if current is not None and not isinstance(value, type(current)):
            value = type(current)(value)  # e.g. an int suggestion for a float field
        setattr(args, key, value)
    args.output_dir = output_dir
    return args


class _ObjectiveReporter(TrainerCallback):
    """Turns each evaluation during a trial into the trial's objective and reports it to optuna."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        trainer, trial = self.trainer, getattr(self.trainer, "_trial", None)
        if trial is None or metrics is None:
            return
        trainer.objective = trainer.compute_objective(dict(metrics))
        if not isinstance(trainer.objective, (list, tuple)):  # optuna prunes single-objective studies only
            import optuna

            trial.report(trainer.objective, state.global_step)
            if trial.should_prune():
                raise optuna.TrialPruned()


def run_hyperparameter_search(
    trainer,
    hp_space: Callable | None = None,
    compute_objective: Callable | None = None,
    n_trials: int = 20,
    direction: str | list[str] = "minimize",
    backend=None,
    hp_name: Callable | None = None,
    **kwargs,
) -> BestRun | list[BestRun]:
    """Runs an optuna study of `n_trials` trainings; returns the best run (a list for several directions).

    Args:
        trainer: a Trainer built with `model_init` (each trial needs a fresh model).
        hp_space: trial -> {argument name: value}; default `default_hp_space_optuna`.
        compute_objective: metrics -> objective (a float, or a list for multi-objective studies).
        n_trials: number of trials.
        direction: "minimize" / "maximize", or a list of them for a multi-objective study.
        backend: "optuna" (or None, meaning optuna).
        hp_name: trial -> run name (the trial's output sub-directory and trial_name).
        **kwargs: `timeout`, `n_jobs`, `gc_after_trial` for `study.optimize`; the rest (sampler,
            pruner, storage, study_name, ...) for `optuna.create_study`.

    Example:
        >>> best = trainer.hyperparameter_search(
        ...     hp_space=lambda t: {"learning_rate": t.suggest_float("learning_rate", 1e-4, 1e-2, log=True)},
        ...     n_trials=10, direction="minimize")
        >>> best.hyperparameters["learning_rate"]
    """
    if trainer.model_init is None:
        raise RuntimeError("hyperparameter_search needs a Trainer built with `model_init` (a fresh model per trial).")
    _resolve_backend(backend)
    optuna = require("optuna", "optuna", "hyperparameter_search")

    base_args = trainer.args
    trainer.hp_space = hp_space or default_hp_space_optuna
    trainer.hp_name = hp_name
    trainer.compute_objective = compute_objective or default_compute_objective
    reporter = _ObjectiveReporter(trainer)

    def objective(trial):
        params = trainer.hp_space(trial)
        run_name = hp_name(trial) if hp_name is not None else f"run-{trial.number}"
        trainer.args = trial_args(base_args, params, os.path.join(base_args.output_dir, run_name))
        trainer._trial, trainer.objective = trial, None
        trainer.train(trial=trial)
        if trainer.objective is None:  # no evaluation ran during training: one now (the reporter reads it)
            metrics = trainer.evaluate()
            if trainer.objective is None:
                trainer.objective = trainer.compute_objective(metrics)
        return trainer.objective

    optimize_kwargs = {k: kwargs.pop(k) for k in ("timeout", "n_jobs", "gc_after_trial") if k in kwargs}
    directions = list(direction) if isinstance(direction, (list, tuple)) else None
    study = optuna.create_study(direction=None if directions else direction, directions=directions, **kwargs)
    trainer.add_callback(reporter)
    try:
        study.optimize(objective, n_trials=n_trials, **optimize_kwargs)
    finally:
        trainer.remove_callback(reporter)
        trainer.args, trainer._trial = base_args, None
    if directions:
        return [BestRun(str(t.number), list(t.values), dict(t.params)) for t in study.best_trials]
    best = study.best_trial
    return BestRun(str(best.number), best.value, dict(best.params))
