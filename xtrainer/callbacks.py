"""The Trainer's callback system: training state, control flags, callbacks and their dispatcher.

Mirrors the public surface and behaviour of `transformers.trainer_callback` (v5): a `TrainerState` is written to
and read from the same `trainer_state.json` layout, `DefaultFlowCallback` takes the same log / evaluate / save
decisions, and stateful callbacks (`ExportableState`) are stored under `stateful_callbacks` in the same form, so
checkpoints are interchangeable between the two libraries.

Strategy fields of the training arguments (`logging_strategy`, `eval_strategy`, `save_strategy`) may be plain
strings or any string enum (xtrainer's or transformers').
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "TRAINER_EVENTS",
    "CallbackHandler",
    "DefaultFlowCallback",
    "EarlyStoppingCallback",
    "ExportableState",
    "PrinterCallback",
    "ProgressCallback",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "restore_callback_states",
]

# Every event a callback may implement, in the order they roughly occur during training.
TRAINER_EVENTS = (
    "on_init_end",
    "on_train_begin",
    "on_epoch_begin",
    "on_step_begin",
    "on_substep_end",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_step_end",
    "on_log",
    "on_prediction_step",
    "on_evaluate",
    "on_predict",
    "on_save",
    "on_epoch_end",
    "on_train_end",
    "on_push_begin",
)


def _strategy(value) -> str:
    """Normalise a strategy given as a string or a (string) enum to its lower-case string value."""
    if value is None:
        return "no"
    return str(getattr(value, "value", value)).lower()


def _every(step, interval) -> bool:
    return interval is not None and interval > 0 and step % interval == 0


def _has_length(obj) -> bool:
    try:
        return len(obj) is not None
    except (TypeError, AttributeError):
        return False


def _json_default(obj):
    """Let numpy / jax / torch scalars and arrays in `log_history` be written as plain JSON values."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


class ExportableState:
    """Mixin for objects whose state is stored in `TrainerState.stateful_callbacks` at checkpoint time.

    `state()` returns `{"args": {...constructor kwargs...}, "attributes": {...other attributes...}}` made of plain
    JSON values; `from_state(state)` rebuilds an instance from such a dict.
    """

    def state(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement `state()` to be an ExportableState.")

    @classmethod
    def from_state(cls, state: dict):
        instance = cls(**state.get("args", {}))
        for name, value in state.get("attributes", {}).items():
            setattr(instance, name, value)
        return instance


def _collect_states(objects) -> dict:
    """`{class name: state}` for exportable objects; several objects of one class give a list of states."""
    states: dict[str, Any] = {}
    for obj in objects:
        if not isinstance(obj, ExportableState):
            raise TypeError(
                f"All callbacks passed to be saved must inherit `ExportableState`, but received {type(obj)}"
            )
        name = type(obj).__name__
        if name not in states:
            states[name] = obj.state()
        elif isinstance(states[name], list):
            states[name].append(obj.state())
        else:
            states[name] = [states[name], obj.state()]
    return states


@dataclass
class TrainerState:
    """The Trainer's inner state, saved with each checkpoint as `trainer_state.json` and passed to callbacks.

    One step is one optimizer update (with gradient accumulation, one step covers several batches). `epoch` is
    fractional during training. `stateful_callbacks` may be given as a list of `ExportableState` objects, which is
    turned into the `{class name: state}` dict that is saved.
    """

    epoch: float = 0
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: int | None = None
    num_train_epochs: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0
    log_history: list[dict[str, float]] = None
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: str | None = None
    trial_params: dict[str, str | float | int | bool] | None = None
    stateful_callbacks: dict[str, Any] | None = None

    def __post_init__(self):
        if self.log_history is None:
            self.log_history = []
        if self.stateful_callbacks is None:
            self.stateful_callbacks = {}
        elif not isinstance(self.stateful_callbacks, dict):
            self.stateful_callbacks = _collect_states(self.stateful_callbacks)

    def save_to_json(self, json_path: str) -> None:
        """Write this state to `json_path` (same layout as transformers' `trainer_state.json`)."""
        text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=_json_default) + "\n"
        with open(json_path, "w", encoding="utf-8") as f:
            f.write(text)

    @classmethod
    def load_from_json(cls, json_path: str) -> TrainerState:
        """Read a state written by `save_to_json` (of this library or of transformers)."""
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning(f"Ignoring unknown fields in {json_path}: {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def compute_steps(self, args, max_steps: int) -> None:
        """Set logging/eval/save steps from `args`; a value below 1 is a fraction of `max_steps` (rounded up)."""
        for kind in ("logging", "eval", "save"):
            steps = getattr(args, f"{kind}_steps", None)
            if steps is None:
                continue
            if steps < 1:
                steps = math.ceil(max_steps * steps)
            setattr(self, f"{kind}_steps", steps)

    def init_training_references(self, trainer, max_steps: int, num_train_epochs, trial) -> None:
        """Record the run's references: trial name/params, step/epoch budget and process-zero flags."""
        hp_name, current_trial = getattr(trainer, "hp_name", None), getattr(trainer, "_trial", None)
        if hp_name is not None and current_trial is not None:
            self.trial_name = hp_name(current_trial)
        self.trial_params = None
        if trial is not None:
            if isinstance(trial, dict):  # ray tune / wandb style
                self.trial_params = {k: v for k, v in trial.items() if k != "wandb"}
            elif hasattr(trial, "params"):  # optuna
                self.trial_params = dict(trial.params)
            elif hasattr(trial, "assignments"):  # sigopt
                self.trial_params = dict(trial.assignments)
            else:
                raise TypeError(f"Unsupported hyperparameter-search trial type: {type(trial)}")
        self.max_steps = max_steps
        self.num_train_epochs = num_train_epochs
        self.is_local_process_zero = bool(trainer.is_local_process_zero())
        self.is_world_process_zero = bool(trainer.is_world_process_zero())

    def update_stateful_callbacks(self, objects) -> None:
        """Refresh `stateful_callbacks` with the current state of the exportable ones among `objects`.

        Done before each checkpoint save, over the handler's callbacks plus the `TrainerControl`.
        """
        self.stateful_callbacks.update(_collect_states(o for o in objects if isinstance(o, ExportableState)))


@dataclass
class TrainerControl(ExportableState):
    """Switches callbacks flip to steer the training loop.

    `should_training_stop` is never reset by the loop; `should_epoch_stop` is reset at each epoch start; the
    save/evaluate/log flags are reset at each step start (and each right after the action it requests).
    """

    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False

    def _new_training(self):
        self.should_training_stop = False

    def _new_epoch(self):
        self.should_epoch_stop = False

    def _new_step(self):
        self.should_save = False
        self.should_evaluate = False
        self.should_log = False

    def state(self) -> dict:
        return {"args": dataclasses.asdict(self), "attributes": {}}


class TrainerCallback:
    """Base class of callbacks: override the events you need.

    Each event receives `(args, state, control, **kwargs)`; kwargs always hold `model`, `processing_class`,
    `optimizer`, `lr_scheduler`, `train_dataloader`, `eval_dataloader`, plus `metrics` for `on_evaluate` /
    `on_predict` and `logs` for `on_log`. Only `control` may be changed; an event that changes it may return it
    (a returned control replaces the one the trainer holds).
    """

    def on_init_end(self, args, state, control, **kwargs):
        """Called at the end of the Trainer's `__init__`."""

    def on_train_begin(self, args, state, control, **kwargs):
        """Called at the beginning of training."""

    def on_train_end(self, args, state, control, **kwargs):
        """Called at the end of training."""

    def on_epoch_begin(self, args, state, control, **kwargs):
        """Called at the beginning of an epoch."""

    def on_epoch_end(self, args, state, control, **kwargs):
        """Called at the end of an epoch."""

    def on_step_begin(self, args, state, control, **kwargs):
        """Called at the beginning of an optimizer step (which may span several accumulated batches)."""

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """Called after gradient clipping, before the optimizer step."""

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Called after the optimizer step, before gradients are cleared."""

    def on_substep_end(self, args, state, control, **kwargs):
        """Called at the end of a gradient-accumulation substep."""

    def on_step_end(self, args, state, control, **kwargs):
        """Called at the end of an optimizer step."""

    def on_evaluate(self, args, state, control, **kwargs):
        """Called after an evaluation (kwargs hold `metrics`)."""

    def on_predict(self, args, state, control, **kwargs):
        """Called after a successful prediction (kwargs hold `metrics`)."""

    def on_save(self, args, state, control, **kwargs):
        """Called after a checkpoint save."""

    def on_log(self, args, state, control, **kwargs):
        """Called after logging (kwargs hold `logs`)."""

    def on_prediction_step(self, args, state, control, **kwargs):
        """Called after each prediction/evaluation step."""

    def on_push_begin(self, args, state, control, **kwargs):
        """Called before pushing the model to the Hub."""


class CallbackHandler(TrainerCallback):
    """Holds the Trainer's callbacks and calls them, in order, for each event."""

    def __init__(self, callbacks, model, processing_class, optimizer, lr_scheduler):
        self.callbacks: list[TrainerCallback] = []
        for cb in callbacks:
            self.add_callback(cb)
        self.model = model
        self.processing_class = processing_class
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.train_dataloader = None
        self.eval_dataloader = None
        if not any(isinstance(cb, DefaultFlowCallback) for cb in self.callbacks):
            logger.warning(
                "The Trainer will not work properly without a `DefaultFlowCallback` in its callbacks; add one with "
                "`trainer.add_callback(DefaultFlowCallback)` before training. The current list of callbacks is:\n"
                + self.callback_list
            )

    def add_callback(self, callback) -> None:
        """Add a callback instance, or a callback class (instantiated with no arguments)."""
        cls = callback if isinstance(callback, type) else type(callback)
        if any(type(cb) is cls for cb in self.callbacks):
            logger.warning(
                f"You are adding a {cls} to the callbacks of this Trainer, but there is already one. The current "
                "list of callbacks is:\n" + self.callback_list
            )
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    def _find(self, callback):
        for cb in self.callbacks:
            if (isinstance(cb, callback) if isinstance(callback, type) else cb == callback):
                return cb
        return None

    def pop_callback(self, callback):
        """Remove and return the first callback matching a class or instance (None when there is none)."""
        cb = self._find(callback)
        if cb is not None:
            self.callbacks.remove(cb)
        return cb

    def remove_callback(self, callback) -> None:
        """Remove the first callback matching a class (no-op if absent) or an instance (ValueError if absent)."""
        if not isinstance(callback, type):
            self.callbacks.remove(callback)
        else:
            self.pop_callback(callback)

    @property
    def callback_list(self) -> str:
        return "\n".join(type(cb).__name__ for cb in self.callbacks)

    def call_event(self, event: str, args, state, control, **kwargs):
        """Call `event` on every callback in order; a non-None return value becomes the new control."""
        common = {
            "model": self.model,
            "processing_class": self.processing_class,
            "optimizer": self.optimizer,
            "lr_scheduler": self.lr_scheduler,
            "train_dataloader": self.train_dataloader,
            "eval_dataloader": self.eval_dataloader,
        }
        common.update(kwargs)
        for cb in self.callbacks:
            result = getattr(cb, event)(args, state, control, **common)
            if result is not None:
                control = result
        return control

    def on_init_end(self, args, state, control, **kwargs):
        return self.call_event("on_init_end", args, state, control, **kwargs)

    def on_train_begin(self, args, state, control, **kwargs):
        control.should_training_stop = False
        return self.call_event("on_train_begin", args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        return self.call_event("on_train_end", args, state, control, **kwargs)

    def on_epoch_begin(self, args, state, control, **kwargs):
        control.should_epoch_stop = False
        return self.call_event("on_epoch_begin", args, state, control, **kwargs)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self.call_event("on_epoch_end", args, state, control, **kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        control._new_step()
        return self.call_event("on_step_begin", args, state, control, **kwargs)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        return self.call_event("on_pre_optimizer_step", args, state, control, **kwargs)

    def on_optimizer_step(self, args, state, control, **kwargs):
        return self.call_event("on_optimizer_step", args, state, control, **kwargs)

    def on_substep_end(self, args, state, control, **kwargs):
        return self.call_event("on_substep_end", args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        return self.call_event("on_step_end", args, state, control, **kwargs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        control.should_evaluate = False
        return self.call_event("on_evaluate", args, state, control, metrics=metrics, **kwargs)

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        return self.call_event("on_predict", args, state, control, metrics=metrics, **kwargs)

    def on_save(self, args, state, control, **kwargs):
        control.should_save = False
        return self.call_event("on_save", args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        control.should_log = False
        return self.call_event("on_log", args, state, control, logs=logs, **kwargs)

    def on_prediction_step(self, args, state, control, **kwargs):
        return self.call_event("on_prediction_step", args, state, control, **kwargs)

    def on_push_begin(self, args, state, control, **kwargs):
        return self.call_event("on_push_begin", args, state, control, **kwargs)


def restore_callback_states(state: TrainerState, handler: CallbackHandler, control: TrainerControl):
    """Rebuild the stateful callbacks (and the control) from `state.stateful_callbacks` after a resume.

    Only callbacks whose class is already registered are restored (several of one class are matched in order);
    stored states of unregistered classes are ignored with a warning. Returns the control to use.
    """
    present = handler.callbacks + [control]
    rebuilt, missing = [], []
    for name, data in state.stateful_callbacks.items():
        matches = [cb for cb in present if type(cb).__name__ == name]
        if not matches:
            missing.append(name)
            continue
        for cb, cb_state in zip(matches, data if isinstance(data, list) else [data]):
            new = type(cb)(**cb_state.get("args", {}))
            for attr, value in cb_state.get("attributes", {}).items():
                setattr(new, attr, value)
            if isinstance(cb, TrainerControl):
                control = new
            else:
                rebuilt.append(new)
                handler.remove_callback(cb)
    if missing:
        logger.warning(f"Checkpoint included callbacks not in the current configuration, ignored: {', '.join(missing)}")
    for cb in rebuilt:
        handler.add_callback(cb)
    return control


class DefaultFlowCallback(TrainerCallback):
    """Decides when to log, evaluate and save (per step or per epoch) and stops training at `max_steps`.

    With `save_strategy="best"` no save is requested here: the trainer saves after an evaluation that produced a
    new best metric.
    """

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step == 1 and getattr(args, "logging_first_step", False):
            control.should_log = True
        if _strategy(args.logging_strategy) == "steps" and _every(step, state.logging_steps):
            control.should_log = True

        at_end = step >= state.max_steps
        eval_delay = getattr(args, "eval_delay", 0) or 0
        # Step-based evaluation runs every eval_steps, and once more at the last step if that one is off-interval.
        if _strategy(args.eval_strategy) == "steps" and eval_delay <= step:
            if _every(step, state.eval_steps) or at_end:
                control.should_evaluate = True
        # Step-based saving runs every save_steps and always at the last step.
        if _strategy(args.save_strategy) == "steps" and (_every(step, state.save_steps) or at_end):
            control.should_save = True
        if at_end:
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if _strategy(args.logging_strategy) == "epoch":
            control.should_log = True
        if _strategy(args.eval_strategy) == "epoch" and (getattr(args, "eval_delay", 0) or 0) <= state.epoch:
            control.should_evaluate = True
        if _strategy(args.save_strategy) == "epoch":
            control.should_save = True
        return control


# The built-in UI and early-stopping callbacks live in their own module; import them here, after
# the base classes they derive from, so `xtrainer.callbacks` keeps transformers' public surface.
from .builtin_callbacks import EarlyStoppingCallback, PrinterCallback, ProgressCallback  # noqa: E402
