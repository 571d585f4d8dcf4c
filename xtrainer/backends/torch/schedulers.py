"""Torch lr schedulers driven by the shared pure schedules (xtrainer/schedules.py).

Step-driven types become a `LambdaLR` over the shared step -> multiplier function; the metric-driven
ones the classes transformers builds (torch's `ReduceLROnPlateau`, transformers' `GreedyLR`), which
evaluation metrics move; without transformers, greedy is a `MetricDrivenScheduler` over the shared pure
state (the same numbers, checked in tests/unit/test_schedules.py). A layer-wise
optimizer (GaLore/APOLLO `*_layerwise`) gets one scheduler per parameter, stepped by a gradient hook
next to that parameter's optimizer, as transformers' `get_scheduler` does (`LayerWiseScheduler`).

The torch and torch_xla backends use `build_lr_scheduler` for `lr_scheduler_type`, and
`is_metric_driven` / `step_with_metric` for any scheduler, the user's included: a metric-driven
scheduler is not stepped after each optimizer step, but with the evaluation metric after each
evaluation (transformers' rule for `ReduceLROnPlateau` and `GreedyLR`).
"""

from __future__ import annotations

import dataclasses

import torch

from ...schedules import (
    GreedyState,
    PlateauState,
    metric_schedule_from_args,
    metric_schedule_update,
    schedule_from_args,
)


class MetricDrivenScheduler(torch.optim.lr_scheduler.LRScheduler):
    """reduce_lr_on_plateau / greedy on the shared pure state, checkpointable like any torch scheduler.

    `step()` after each optimizer step leaves the lr alone; `step(metric)` (or `observe(metric)`)
    after each evaluation moves it. Groups whose initial lr is the schedule's base lr get its absolute
    lr (bitwise torch's / transformers' values); other groups are scaled by the same multiplier.
    """

    def __init__(self, optimizer, metric_state: PlateauState | GreedyState):
        self.metric_state = metric_state
        super().__init__(optimizer)

    def get_lr(self):
        state = self.metric_state
        return [state.lr if base == state.base_lr else base * state.multiplier for base in self.base_lrs]

    def observe(self, metric: float) -> None:
        """Feeds one evaluation metric and applies the resulting lr to the optimizer."""
        self.metric_state = metric_schedule_update(self.metric_state, metric)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def step(self, metrics=None, epoch=None):  # noqa: D102 - torch's signature; metrics as ReduceLROnPlateau's
        if metrics is not None:
            self.observe(metrics)
            return
        self._step_count = getattr(self, "_step_count", 0) + 1
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        # Plain values only, so the file loads with weights_only=True.
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "metric_state")}
        state["kind"] = "greedy" if isinstance(self.metric_state, GreedyState) else "plateau"
        state["plateau"] = dataclasses.asdict(self.metric_state)  # key kept from the plateau-only format
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        fields = state_dict.pop("plateau")
        kind = GreedyState if state_dict.pop("kind", "plateau") == "greedy" else PlateauState
        if not isinstance(self.metric_state, kind):
            raise ValueError(
                f"scheduler.pt holds a {kind.__name__} schedule but this run's lr_scheduler_type builds a "
                f"{type(self.metric_state).__name__}; resume with the lr_scheduler_type the checkpoint was written with."
            )
        if kind is GreedyState:
            fields["window"] = tuple(fields.get("window", ()))
        self.metric_state = kind(**fields)
        self.__dict__.update(state_dict)


def is_metric_driven(scheduler) -> bool:
    """Whether `scheduler` is stepped with an evaluation metric rather than after each optimizer step.

    True for torch's ReduceLROnPlateau, transformers' GreedyLR and xtrainer's MetricDrivenScheduler:
    the classes transformers' Trainer steps after evaluation.
    """
    if isinstance(scheduler, (MetricDrivenScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        return True
    return any(cls.__name__ == "GreedyLR" and cls.__module__.startswith("transformers") for cls in type(scheduler).__mro__)


def step_with_metric(scheduler, metric: float) -> None:
    """Steps a metric-driven scheduler with one evaluation metric; other schedulers are left alone."""
    if isinstance(scheduler, MetricDrivenScheduler):
        scheduler.observe(metric)
    elif is_metric_driven(scheduler):
        scheduler.step(metric)
    for per_param in getattr(scheduler, "param_schedulers", {}).values():  # a layer-wise optimizer's
        step_with_metric(per_param, metric)


def current_lr(scheduler, optimizer) -> float:
    """The lr of the optimizer's first group, as transformers logs it."""
    if is_metric_driven(scheduler) or not hasattr(scheduler, "get_last_lr"):
        return float(optimizer.param_groups[0]["lr"])
    lr = scheduler.get_last_lr()[0]
    return float(lr.item() if torch.is_tensor(lr) else lr)


def _transformers_greedy_lr():
    """transformers' GreedyLR class, or None without transformers (xtrainer's MetricDrivenScheduler then)."""
    try:
        from transformers.optimization import GreedyLR
    except ImportError:
        return None
    return GreedyLR


def _single_scheduler(optimizer, args, num_training_steps: int):
    state = metric_schedule_from_args(args)  # also checks lr_scheduler_kwargs, with the messages jax gives
    if state is not None:
        # The classes transformers' get_scheduler builds, so `trainer.lr_scheduler` is what HF code expects
        # (isinstance checks, .patience, ._last_lr, state_dict); the pure state is the fallback without transformers.
        kwargs = dict(args.lr_scheduler_kwargs or {})
        if isinstance(state, PlateauState):
            return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kwargs)
        greedy_lr = _transformers_greedy_lr()
        return greedy_lr(optimizer, **kwargs) if greedy_lr is not None else MetricDrivenScheduler(optimizer, state)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_from_args(args, num_training_steps))


class LayerWiseScheduler:
    """The schedulers of a layer-wise optimizer: one per parameter, each stepped by a gradient hook right after
    that parameter's optimizer. This object only reports their lrs and saves them.

    transformers' LayerWiseDummyScheduler plays this part there, but it cannot be built with torch >= 2.13 (its
    per-parameter lrs no longer fit the dummy optimizer's single group), so xtrainer has its own.
    """

    def __init__(self, optimizer, schedulers: dict):
        self.optimizer = optimizer
        self.param_schedulers = schedulers  # parameter -> its scheduler, in the optimizer's parameter order

    def step(self, *args, **kwargs) -> None:
        """Nothing: the gradient hooks step each parameter's scheduler."""

    def get_last_lr(self) -> list[float]:
        return [lr for scheduler in self.param_schedulers.values() for lr in scheduler.get_last_lr()]

    def state_dict(self) -> dict:
        return {"param_schedulers": [s.state_dict() for s in self.param_schedulers.values()]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["param_schedulers"]
        if len(saved) != len(self.param_schedulers):
            raise ValueError(f"scheduler.pt holds {len(saved)} per-parameter schedulers; this model has "
                             f"{len(self.param_schedulers)}.")
        for scheduler, state in zip(self.param_schedulers.values(), saved):
            scheduler.load_state_dict(state)


def build_lr_scheduler(optimizer, args, num_training_steps: int):
    """The torch scheduler that `args.lr_scheduler_type` names, over `optimizer` (transformers' `get_scheduler`).

    Args:
        optimizer: the optimizer whose param-group lrs the scheduler sets (a layer-wise optimizer's
            `optimizer_dict` gets one scheduler per parameter).
        args: TrainingArguments (lr_scheduler_type, lr_scheduler_kwargs, warmup_steps, learning_rate).
        num_training_steps: optimizer steps of the run.

    Returns:
        A `LambdaLR` over the shared schedule, a `ReduceLROnPlateau` / `GreedyLR` (or `MetricDrivenScheduler`),
        or, for a layer-wise optimizer, a `LayerWiseScheduler` over one of those per parameter.
    """
    per_param = getattr(optimizer, "optimizer_dict", None)
    if per_param is None:
        return _single_scheduler(optimizer, args, num_training_steps)
    schedulers = {param: _single_scheduler(opt, args, num_training_steps) for param, opt in per_param.items()}

    def step_scheduler(param):  # runs after the parameter's own optimizer hook (registered first)
        schedulers[param].step()

    for param in per_param:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(step_scheduler)
    return LayerWiseScheduler(optimizer, schedulers)
