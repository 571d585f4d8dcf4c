"""The Trainer's overridable hooks, handed to a backend as one small object.

transformers users customise training by subclassing `Trainer` and overriding methods such as
`compute_loss`, `training_step` or `prediction_step`; libraries like TRL are built on exactly those
hooks. The front keeps them as methods with transformers' signatures. A backend never sees the
Trainer itself: it gets a `TrainerHooks`, which calls the (possibly overridden) methods and tells
which of them a user replaced, so a backend that cannot honour an override refuses it when the
Trainer is built instead of skipping it.

Who calls what (transformers' call sites, on every backend that can honour them):
    training_step(model, inputs, num_items_in_batch)       once per micro-batch (torch, torch_xla)
      -> _prepare_inputs(inputs)
      -> compute_loss_context_manager()
      -> compute_loss(model, inputs, num_items_in_batch=...)
    prediction_step(model, inputs, prediction_loss_only, ignore_keys)   once per eval batch
      -> compute_loss(model, inputs, return_outputs=True, num_items_in_batch=...)
    create_optimizer() / create_scheduler(num_training_steps, optimizer)  once per train()
On `jax` the train step is one compiled program: `compute_loss` (and `_prepare_inputs`) are traced
into it, and the hooks that need eager control of the backward pass are refused (see
backends/jax/hooks_support.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

#: The methods a subclass may override to change how xtrainer trains, evaluates or saves. An override of
#: one of them is either honoured by the backend or refused at `Trainer(...)`.
HOOK_NAMES = (
    "compute_loss",
    "training_step",
    "prediction_step",
    "_prepare_inputs",
    "_prepare_input",
    "compute_loss_context_manager",
    "autocast_smart_context_manager",
    "create_optimizer",
    "create_scheduler",
    "create_optimizer_and_scheduler",
    "get_decay_parameter_names",
    "get_optimizer_cls_and_kwargs",
    "get_batch_samples",
    "_save",
    "_load_from_checkpoint",
    "_maybe_log_save_evaluate",
)


def _defined_by_xtrainer(func: Any) -> bool:
    module = getattr(func, "__module__", None) or ""
    return module == "xtrainer" or module.startswith("xtrainer.")


def user_overrides(trainer: Any) -> frozenset[str]:
    """Names in HOOK_NAMES that the trainer's class, or the instance itself, defines outside xtrainer.

    xtrainer's own subclasses (Seq2SeqTrainer) do not count: they are part of the library and each
    backend supports them.
    """
    found = set()
    for name in HOOK_NAMES:
        if name in vars(trainer):  # assigned on the instance (trainer.compute_loss = fn)
            found.add(name)
            continue
        attr = inspect.getattr_static(type(trainer), name, None)
        func = getattr(attr, "__func__", attr)  # staticmethod / classmethod
        if func is not None and not _defined_by_xtrainer(func):
            found.add(name)
    return frozenset(found)


class TrainerHooks:
    """What a backend may call back into: the Trainer's hook methods and the settings they read.

    Every call goes through the Trainer's attribute, so an override (or a method assigned on the
    instance) is what runs.
    """

    def __init__(self, trainer: Any):
        self._trainer = trainer
        self.overridden: frozenset[str] = user_overrides(trainer)

    def overrides(self, name: str) -> bool:
        """Whether the user replaced hook `name` (one of HOOK_NAMES)."""
        return name in self.overridden

    # ------------------------------------------------------------------ the hooks

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        return self._trainer.compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        return self._trainer.training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        return self._trainer.prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def prepare_inputs(self, inputs):
        return self._trainer._prepare_inputs(inputs)

    def compute_loss_context_manager(self):
        return self._trainer.compute_loss_context_manager()

    def get_decay_parameter_names(self, model) -> list[str]:
        return self._trainer.get_decay_parameter_names(model)

    def optimizer_cls_and_kwargs(self, model) -> tuple[Any, dict]:
        """The optimizer class and kwargs: `optimizer_cls_and_kwargs=` when given, else the (overridable)
        `get_optimizer_cls_and_kwargs(args, model)`."""
        trainer = self._trainer
        if trainer.optimizer_cls_and_kwargs is not None:
            return trainer.optimizer_cls_and_kwargs
        return trainer.get_optimizer_cls_and_kwargs(trainer.args, model)

    # ------------------------------------------------------------------ settings the default hooks read

    @property
    def explicit_optimizer_cls_and_kwargs(self) -> tuple | None:
        """The Trainer's `optimizer_cls_and_kwargs=` argument (None when not given)."""
        return self._trainer.optimizer_cls_and_kwargs

    @property
    def compute_loss_func(self) -> Callable | None:
        return self._trainer.compute_loss_func

    @property
    def loss_is_scaled_for_ga(self) -> bool | None:
        """The user's statement that compute_loss already normalises over the whole accumulation window
        (True), is a per-batch mean (False), or None to let the Trainer decide as transformers does."""
        return getattr(self._trainer, "loss_is_scaled_for_ga", None)

    @property
    def label_smoothing_factor(self) -> float:
        """The smoothing the default compute_loss applies (0 when the Trainer turned it off, e.g. multi-label)."""
        smoother = getattr(self._trainer, "label_smoother", None)
        return float(smoother.epsilon) if smoother is not None else 0.0

    @property
    def current_gradient_accumulation_steps(self) -> int:
        """Micro-batches in the accumulation window being trained (fewer at the end of an epoch)."""
        return getattr(self._trainer, "current_gradient_accumulation_steps", 1) or 1

    @property
    def label_names(self) -> list[str]:
        return list(self._trainer.label_names or [])

    @property
    def global_step(self) -> int:
        return self._trainer.state.global_step


class UnsupportedHookError(TypeError):
    """A Trainer subclass overrides a hook that the chosen backend cannot honour."""


def refuse_overrides(hooks: TrainerHooks, backend: str, reasons: dict[str, str]) -> None:
    """Raises UnsupportedHookError naming every overridden hook in `reasons` (name -> why + alternative)."""
    refused = [name for name in reasons if hooks.overrides(name)]
    if refused:
        lines = "\n".join(f"  - {name}: {reasons[name]}" for name in refused)
        raise UnsupportedHookError(
            f"This Trainer subclass overrides hooks that backend={backend!r} cannot honour:\n{lines}"
        )


__all__ = ["HOOK_NAMES", "TrainerHooks", "UnsupportedHookError", "refuse_overrides", "user_overrides"]
