"""Learning-rate schedules, as pure functions shared by every backend.

This module owns the definition of each ``SchedulerType``: given the run length and the schedule's kwargs,
:func:`build_schedule` returns a function ``step -> lr multiplier`` (the ``lr_lambda`` convention of
``torch.optim.lr_scheduler.LambdaLR``: the learning rate is ``learning_rate * multiplier``).

The same function serves two callers:

* a python ``int`` step (the torch backend's ``LambdaLR``) gets a python ``float`` computed with the same float64
  operations, in the same order, as transformers' ``get_scheduler`` lambdas, so the lrs are bitwise those of HF;
* a ``jax.numpy`` integer scalar, traced or not (the JAX backend computes the lr on device inside its jitted step),
  gets a floating-point array of the default float dtype; phases are then selected branch-free with ``where``.

``reduce_lr_on_plateau`` and ``greedy`` are driven by evaluation metrics rather than by the step: their step
multiplier is the constant 1.0, and the metric-driven part is functional: :class:`PlateauState` /
:func:`plateau_init` / :func:`plateau_update` reproduce ``torch.optim.lr_scheduler.ReduceLROnPlateau``, and
:class:`GreedyState` / :func:`greedy_init` / :func:`greedy_update` transformers' ``GreedyLR``. Backends feed
them the evaluation metric (``Backend.on_eval_metric``) through :func:`metric_schedule_update`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator
import types
from typing import Any, Callable

import numpy as np

from .trainer_utils import SchedulerType

__all__ = [
    "GreedyState", "METRIC_DRIVEN", "PlateauState", "build_schedule", "greedy_init", "greedy_update",
    "metric_schedule_from_args", "metric_schedule_update", "plateau_init", "plateau_update", "schedule_names",
]

Schedule = Callable[[Any], Any]

# The python path: plain float64 math, so results match HF's lambdas bit for bit.
_PY = types.SimpleNamespace(float=float, cos=math.cos, sqrt=math.sqrt, maximum=max)
_JAX: types.SimpleNamespace | None = None


def _jax_namespace() -> types.SimpleNamespace:
    # jax is imported lazily so that the torch backend never pays for (or requires) it.
    global _JAX
    if _JAX is None:
        import jax.numpy as jnp

        dtype = jnp.result_type(float)  # float32 unless jax_enable_x64
        _JAX = types.SimpleNamespace(
            float=lambda x: jnp.asarray(x).astype(dtype), cos=jnp.cos, sqrt=jnp.sqrt, maximum=jnp.maximum,
            where=jnp.where, asarray=jnp.asarray, dtype=dtype,
        )
    return _JAX


def _piecewise(xp, s, branches, default):
    """First branch whose condition holds, else ``default``; each is a function of the step."""
    if xp is _PY:
        # Only the chosen branch runs: the others may divide by zero or take sqrt of a negative number.
        for cond, value in branches:
            if cond(s):
                return value(s)
        return default(s)
    out = default(s)
    for cond, value in reversed(branches):
        out = xp.where(cond(s), value(s), out)  # NaN/inf in unselected branches is discarded here
    return out


def _warmup(xp, s, warmup: int):
    return xp.float(s) / float(max(1, warmup))


# Each factory takes (num_warmup_steps, num_training_steps, learning_rate, **schedule kwargs) and returns
# ``fn(xp, step)``. The keyword-only parameters of a factory are exactly the kwargs that schedule accepts.


def _constant(W, T, lr):
    return lambda xp, s: 1.0


def _constant_with_warmup(W, T, lr):
    return lambda xp, s: _piecewise(xp, s, [(lambda s: s < W, lambda s: _warmup(xp, s, W))], lambda s: 1.0)


def _linear(W, T, lr):
    def fn(xp, s):
        decay = lambda s: xp.maximum(0.0, xp.float(T - s) / float(max(1, T - W)))
        return _piecewise(xp, s, [(lambda s: s < W, lambda s: _warmup(xp, s, W))], decay)

    return fn


def _cosine_factory(W, T, num_cycles, min_lr_rate):
    scale = math.pi * float(num_cycles) * 2.0  # HF's left-to-right product, so the float64 rounding matches

    def fn(xp, s):
        def decay(s):
            progress = xp.float(s - W) / float(max(1, T - W))
            factor = 0.5 * (1.0 + xp.cos(scale * progress))
            return xp.maximum(0.0, factor * (1 - min_lr_rate) + min_lr_rate)

        return _piecewise(xp, s, [(lambda s: s < W, lambda s: _warmup(xp, s, W))], decay)

    return fn


def _cosine(W, T, lr, *, num_cycles=0.5):
    # HF's cosine is the min-lr cosine with a zero floor (same lambda, min_lr_rate=0.0).
    return _cosine_factory(W, T, num_cycles, 0.0)


def _min_lr_rate(name, lr, min_lr, min_lr_rate):
    """The floor as a fraction of the peak lr, from exactly one of `min_lr` (absolute) and `min_lr_rate`."""
    if min_lr is not None and min_lr_rate is not None:
        raise ValueError(f"{name}: set only one of `min_lr` and `min_lr_rate`")
    if min_lr is not None:
        if lr is None:
            raise ValueError(f"{name} with `min_lr` needs `learning_rate` (min_lr is an absolute lr)")
        return min_lr / lr
    if min_lr_rate is None:
        raise ValueError(f"{name} requires `min_lr` or `min_lr_rate` in scheduler_kwargs")
    return min_lr_rate


def _cosine_with_min_lr(W, T, lr, *, num_cycles=0.5, min_lr=None, min_lr_rate=None):
    return _cosine_factory(W, T, num_cycles, _min_lr_rate("cosine_with_min_lr", lr, min_lr, min_lr_rate))


def _cosine_warmup_with_min_lr(W, T, lr, *, num_cycles=0.5, min_lr=None, min_lr_rate=None, warmup_lr_rate=None):
    # Unlike cosine_with_min_lr, this schedule counts the step being taken: warmup reaches the peak at
    # step W-1 (not W) and the decay is one step further along, so its last step lands on the floor.
    rate = _min_lr_rate("cosine_warmup_with_min_lr", lr, min_lr, min_lr_rate)
    scale = math.pi * num_cycles * 2.0  # HF's left-to-right product, so the float64 rounding matches
    Wf, Tf = float(W), float(T)

    def fn(xp, s):
        def warm(s):
            if warmup_lr_rate is None:
                return (xp.float(s) + 1.0) / max(1.0, Wf)
            start = float(warmup_lr_rate)
            return start + (1.0 - start) * xp.float(s) / max(1, Wf - 1)

        def decay(s):
            progress = (xp.float(s) - Wf + 1.0) / max(1.0, Tf - Wf)
            factor = 0.5 * (1.0 + xp.cos(scale * progress))
            return xp.maximum(0.0, factor * (1 - rate) + rate)

        return _piecewise(xp, s, [(lambda s: s < W, warm)], decay)

    return fn


def _cosine_with_restarts(W, T, lr, *, num_cycles=1):
    def fn(xp, s):
        progress = lambda s: xp.float(s - W) / float(max(1, T - W))
        decay = lambda s: xp.maximum(0.0, 0.5 * (1.0 + xp.cos(math.pi * ((float(num_cycles) * progress(s)) % 1.0))))
        warm = (lambda s: s < W, lambda s: _warmup(xp, s, W))
        return _piecewise(xp, s, [warm, (lambda s: progress(s) >= 1.0, lambda s: 0.0)], decay)

    return fn


def _polynomial(W, T, lr, *, lr_end=1e-7, power=1.0):
    if lr is None:
        raise ValueError("polynomial needs `learning_rate` (lr_end is an absolute lr)")
    if not lr > lr_end:
        raise ValueError(f"polynomial: `lr_end` ({lr_end}) must be smaller than learning_rate ({lr})")
    # HF divides by zero when the step reaches T == W; any positive divisor gives the same value (1.0) there.
    decay_steps = (T - W) or 1

    def fn(xp, s):
        def decay(s):
            if xp is _PY:
                remaining = 1 - (s - W) / decay_steps
            else:
                # XLA turns division by a constant into a reciprocal multiply, so `1 - x / d` need not reach 0.0
                # at the last step, and a fractional power magnifies that; the integer numerator makes it exact.
                remaining = xp.float(T - s) / float(decay_steps)
            return ((lr - lr_end) * remaining**power + lr_end) / lr

        warm = (lambda s: s < W, lambda s: _warmup(xp, s, W))
        return _piecewise(xp, s, [warm, (lambda s: s > T, lambda s: lr_end / lr)], decay)

    return fn


def _inverse_sqrt(W, T, lr, *, timescale=None):
    if timescale is None:
        timescale = W or 10_000
    if timescale <= 0:
        raise ValueError(f"inverse_sqrt: `timescale` must be positive, got {timescale}")
    shift = timescale - W

    def fn(xp, s):
        decay = lambda s: 1.0 / xp.sqrt((s + shift) / timescale)
        return _piecewise(xp, s, [(lambda s: s < W, lambda s: _warmup(xp, s, W))], decay)

    return fn


_SHAPES = ("linear", "cosine", "1-sqrt")


def _warmup_stable_decay(
    W, T, lr, *, num_decay_steps=None, num_stable_steps=None, warmup_type="linear", decay_type="cosine",
    min_lr_ratio=0.0, num_cycles=0.5,
):
    if num_decay_steps is None:
        raise ValueError("warmup_stable_decay requires `num_decay_steps` in scheduler_kwargs")
    for arg, value in (("warmup_type", warmup_type), ("decay_type", decay_type)):
        if value not in _SHAPES:
            raise ValueError(f"warmup_stable_decay: `{arg}` must be one of {list(_SHAPES)}, got {value!r}")
    D = num_decay_steps
    S = T - W - D if num_stable_steps is None else num_stable_steps
    r = min_lr_ratio
    scale = math.pi * float(num_cycles) * 2.0

    def fn(xp, s):
        def warm(s):
            p = _warmup(xp, s, W)
            f = {"linear": lambda: p, "cosine": lambda: 0.5 * (1.0 - xp.cos(math.pi * p)),
                 "1-sqrt": lambda: 1.0 - xp.sqrt(1.0 - p)}[warmup_type]()
            return xp.maximum(0.0, f * (1.0 - r) + r)

        def decay(s):
            p = xp.float(s - W - S) / float(max(1, D))
            f = {"linear": lambda: 1.0 - p, "cosine": lambda: 0.5 * (1.0 + xp.cos(scale * p)),
                 "1-sqrt": lambda: 1.0 - xp.sqrt(p)}[decay_type]()
            return xp.maximum(0.0, f * (1.0 - r) + r)

        branches = [(lambda s: s < W, warm), (lambda s: s < W + S, lambda s: 1.0), (lambda s: s < W + S + D, decay)]
        return _piecewise(xp, s, branches, lambda s: float(r))

    return fn


def _reduce_lr_on_plateau(W, T, lr, **plateau_kwargs):
    plateau_init(1.0 if lr is None else lr, plateau_kwargs)  # validate the kwargs now rather than at first eval
    return _constant(W, T, lr)


def _greedy(W, T, lr, **greedy_kwargs):
    greedy_init(1.0 if lr is None else lr, greedy_kwargs)  # validate the kwargs now rather than at first eval
    return _constant(W, T, lr)


_FACTORIES = {
    SchedulerType.LINEAR: _linear,
    SchedulerType.COSINE: _cosine,
    SchedulerType.COSINE_WITH_RESTARTS: _cosine_with_restarts,
    SchedulerType.POLYNOMIAL: _polynomial,
    SchedulerType.CONSTANT: _constant,
    SchedulerType.CONSTANT_WITH_WARMUP: _constant_with_warmup,
    SchedulerType.INVERSE_SQRT: _inverse_sqrt,
    SchedulerType.REDUCE_ON_PLATEAU: _reduce_lr_on_plateau,
    SchedulerType.COSINE_WITH_MIN_LR: _cosine_with_min_lr,
    SchedulerType.COSINE_WARMUP_WITH_MIN_LR: _cosine_warmup_with_min_lr,
    SchedulerType.WARMUP_STABLE_DECAY: _warmup_stable_decay,
    SchedulerType.GREEDY: _greedy,
}

#: The schedules driven by evaluation metrics rather than by the step (their step multiplier is 1.0).
METRIC_DRIVEN = frozenset({SchedulerType.REDUCE_ON_PLATEAU.value, SchedulerType.GREEDY.value})


def schedule_names() -> list[str]:
    """Names accepted by :func:`build_schedule`.

    Returns:
        The ``SchedulerType`` values this module implements, in declaration order.
    """
    return [t.value for t in SchedulerType if t in _FACTORIES]


def _non_negative_int(name: str, value) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"`{name}` must be an int, got {value!r}") from None
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}")
    return value


def build_schedule(
    name,
    *,
    num_training_steps: int,
    num_warmup_steps: int = 0,
    learning_rate: float | None = None,
    scheduler_kwargs: dict | None = None,
) -> Schedule:
    """Build the lr multiplier function of a schedule, with transformers' ``get_scheduler`` semantics.

    Args:
        name: a ``SchedulerType`` or its string value (see :func:`schedule_names`).
        num_training_steps: total number of optimizer steps of the run.
        num_warmup_steps: steps of linear warmup from 0 (ignored by ``constant`` and ``reduce_lr_on_plateau``).
        learning_rate: the peak lr; needed only where kwargs are absolute lrs (``polynomial``'s ``lr_end``,
            ``cosine_with_min_lr``'s ``min_lr``).
        scheduler_kwargs: the schedule's own kwargs, as in ``TrainingArguments.lr_scheduler_kwargs``. For
            ``reduce_lr_on_plateau`` they are ``ReduceLROnPlateau``'s and are only validated here: that schedule's
            step multiplier is always 1.0 and the metric-driven part is :func:`plateau_init`/:func:`plateau_update`.

    Returns:
        ``schedule(step)``: for a python/numpy int, a python float, bitwise equal to HF's ``lr_lambda(step)``;
        for a ``jax.numpy`` integer scalar (also under ``jax.jit``), a float array of jax's default float dtype.

    Raises:
        ValueError: unknown name (the message lists valid names), unknown or invalid kwarg, negative step counts.
    """
    try:
        factory = _FACTORIES[SchedulerType(name)]
    except (ValueError, KeyError):
        raise ValueError(f"Unknown lr scheduler {name!r}; valid names: {', '.join(schedule_names())}") from None
    T = _non_negative_int("num_training_steps", num_training_steps)
    W = _non_negative_int("num_warmup_steps", num_warmup_steps)
    kwargs = dict(scheduler_kwargs or {})
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        allowed = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(
                f"Unknown scheduler_kwargs {unknown} for lr scheduler {SchedulerType(name).value!r}; "
                f"accepted: {allowed or 'none'}"
            )
    fn = factory(W, T, learning_rate, **kwargs)

    def schedule(step):
        if isinstance(step, (int, np.integer)) and not isinstance(step, bool):
            return float(fn(_PY, int(step)))
        xp = _jax_namespace()
        return xp.asarray(fn(xp, xp.asarray(step)), dtype=xp.dtype)

    schedule.__name__ = f"{SchedulerType(name).value}_schedule"
    return schedule


@dataclasses.dataclass(frozen=True)
class PlateauState:
    """Immutable state of a reduce-on-plateau schedule (``torch.optim.lr_scheduler.ReduceLROnPlateau``).

    ``lr`` is tracked as an absolute value because torch compares and floors absolute lrs (``min_lr``, ``eps``);
    use ``lr`` where bitwise torch parity matters and ``multiplier`` to scale another base lr.
    """

    lr: float
    base_lr: float
    mode: str = "min"
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: str = "rel"
    cooldown: int = 0
    min_lr: float = 0.0
    eps: float = 1e-8
    best: float = math.inf
    num_bad_epochs: int = 0
    cooldown_counter: int = 0

    @property
    def multiplier(self) -> float:
        """The current lr as a fraction of ``base_lr``."""
        return self.lr / self.base_lr if self.base_lr else 1.0


_PLATEAU_KWARGS = ("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown", "min_lr", "eps")


def plateau_init(learning_rate: float = 1.0, scheduler_kwargs: dict | None = None) -> PlateauState:
    """Initial reduce-on-plateau state, with HF's defaults (``ReduceLROnPlateau``'s own).

    Args:
        learning_rate: the starting (absolute) lr; keep 1.0 to track a bare multiplier.
        scheduler_kwargs: overrides among mode, factor, patience, threshold, threshold_mode, cooldown, min_lr, eps.

    Returns:
        A fresh :class:`PlateauState` with ``multiplier == 1.0``.

    Raises:
        ValueError: unknown kwarg, ``factor >= 1``, or an unknown ``mode``/``threshold_mode``.
    """
    kwargs = dict(scheduler_kwargs or {})
    unknown = sorted(set(kwargs) - set(_PLATEAU_KWARGS))
    if unknown:
        raise ValueError(
            f"Unknown scheduler_kwargs {unknown} for 'reduce_lr_on_plateau'; accepted: {list(_PLATEAU_KWARGS)}"
        )
    if kwargs.get("factor", 0.1) >= 1.0:
        raise ValueError(f"reduce_lr_on_plateau: `factor` must be < 1.0, got {kwargs['factor']}")
    if kwargs.get("mode", "min") not in ("min", "max"):
        raise ValueError(f"reduce_lr_on_plateau: `mode` must be 'min' or 'max', got {kwargs['mode']!r}")
    if kwargs.get("threshold_mode", "rel") not in ("rel", "abs"):
        got = kwargs["threshold_mode"]
        raise ValueError(f"reduce_lr_on_plateau: `threshold_mode` must be 'rel' or 'abs', got {got!r}")
    best = math.inf if kwargs.get("mode", "min") == "min" else -math.inf
    lr = float(learning_rate)
    return PlateauState(lr=lr, base_lr=lr, best=best, **kwargs)


def _is_better(state: PlateauState, current: float) -> bool:
    # Same expressions as torch (e.g. `best * (1.0 - threshold)`), so ties resolve identically.
    if state.threshold_mode == "rel":
        if state.mode == "min":
            return current < state.best * (1.0 - state.threshold)
        return current > state.best * (state.threshold + 1.0)
    if state.mode == "min":
        return current < state.best - state.threshold
    return current > state.best + state.threshold


def plateau_update(state: PlateauState, metric) -> PlateauState:
    """Feed one evaluation metric, as ``ReduceLROnPlateau.step(metric)`` does.

    Args:
        state: the current state (unchanged; a new one is returned).
        metric: the monitored value (anything ``float()`` accepts, e.g. a 0-d array).

    Returns:
        The next :class:`PlateauState`; its ``lr``/``multiplier`` apply from now on.
    """
    current = float(metric)
    best, bad, cooldown_counter, lr = state.best, state.num_bad_epochs + 1, state.cooldown_counter, state.lr
    if _is_better(state, current):
        best, bad = current, 0
    if cooldown_counter > 0:
        cooldown_counter, bad = cooldown_counter - 1, 0  # bad epochs during cooldown do not count
    if bad > state.patience:
        new_lr = max(lr * state.factor, state.min_lr)
        if lr - new_lr > state.eps:  # torch skips reductions too small to matter
            lr = new_lr
        cooldown_counter, bad = state.cooldown, 0
    return dataclasses.replace(state, lr=lr, best=best, num_bad_epochs=bad, cooldown_counter=cooldown_counter)


@dataclasses.dataclass(frozen=True)
class GreedyState:
    """Immutable state of a greedy schedule (transformers' ``GreedyLR``): the lr rises while the metric keeps
    improving and falls when it plateaus, within [min_lr, max_lr], and restarts after a long stay at min_lr.

    As in transformers, ``min_lr`` (default 1e-3) and ``max_lr`` are absolute lrs, so with a peak lr below
    min_lr the schedule can only raise the lr.
    """

    lr: float
    base_lr: float
    mode: str = "min"
    factor: float = 0.95
    patience: int = 10
    threshold: float = 1e-6
    threshold_mode: str = "abs"
    cooldown: int = 0
    warmup: int = 0
    min_lr: float = 1e-3
    max_lr: float = 1.0
    eps: float = 1e-8
    verbose: bool = False
    smooth: bool = False
    window_size: int = 50
    reset_start: int = 500
    reset_start_original: int = 500
    best: float = math.inf
    num_bad_epochs: int = 0
    num_good_epochs: int = 0
    cooldown_counter: int = 0
    warmup_counter: int = 0
    last_epoch: int = 0
    window: tuple = ()  # the smoothing window's values, oldest first
    window_sum: float = 0.0

    @property
    def multiplier(self) -> float:
        """The current lr as a fraction of ``base_lr``."""
        return self.lr / self.base_lr if self.base_lr else 1.0


_GREEDY_KWARGS = ("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown", "warmup", "min_lr",
                  "max_lr", "eps", "verbose", "smooth", "window_size", "reset_start")


def _one_lr(name: str, value) -> float:
    # GreedyLR takes one bound per parameter group; xtrainer schedules one lr for all groups.
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(
                f"greedy: per-group `{name}` lists with different values are not supported (xtrainer schedules one "
                f"lr for every parameter group); give one number, got {list(value)}"
            )
        value = value[0]
    return float(value)


def greedy_init(learning_rate: float = 1.0, scheduler_kwargs: dict | None = None) -> GreedyState:
    """Initial greedy-schedule state, with transformers' ``GreedyLR`` defaults.

    Args:
        learning_rate: the starting (absolute) lr, also the lr a reset returns to.
        scheduler_kwargs: overrides among mode, factor, patience, threshold, threshold_mode, cooldown, warmup,
            min_lr, max_lr, eps, verbose, smooth, window_size, reset_start.

    Returns:
        A fresh :class:`GreedyState` with ``multiplier == 1.0``.

    Raises:
        ValueError: unknown kwarg, ``factor >= 1``, an unknown ``mode``/``threshold_mode``, per-group bounds.
    """
    kwargs = dict(scheduler_kwargs or {})
    unknown = sorted(set(kwargs) - set(_GREEDY_KWARGS))
    if unknown:
        raise ValueError(f"Unknown scheduler_kwargs {unknown} for 'greedy'; accepted: {list(_GREEDY_KWARGS)}")
    if kwargs.get("factor", 0.95) >= 1.0:
        raise ValueError(f"greedy: `factor` must be < 1.0, got {kwargs['factor']}")
    if kwargs.get("mode", "min") not in ("min", "max"):
        raise ValueError(f"greedy: `mode` must be 'min' or 'max', got {kwargs['mode']!r}")
    if kwargs.get("threshold_mode", "abs") not in ("rel", "abs"):
        raise ValueError(f"greedy: `threshold_mode` must be 'rel' or 'abs', got {kwargs['threshold_mode']!r}")
    for bound in ("min_lr", "max_lr"):
        if bound in kwargs:
            kwargs[bound] = _one_lr(bound, kwargs[bound])
    best = math.inf if kwargs.get("mode", "min") == "min" else -math.inf
    lr = float(learning_rate)
    reset_start = kwargs.get("reset_start", 500)
    return GreedyState(lr=lr, base_lr=lr, best=best, reset_start_original=reset_start, **kwargs)


def _greedy_is_better(state: GreedyState, current: float) -> bool:
    if state.mode == "min":
        if state.threshold_mode == "rel":
            return current < state.best * (1.0 - state.threshold)
        return current < state.best - state.threshold
    if state.threshold_mode == "rel":
        return current > state.best * (1.0 + state.threshold)
    return current > state.best + state.threshold


def greedy_update(state: GreedyState, metric) -> GreedyState:
    """Feed one evaluation metric, as ``GreedyLR.step(metric)`` does.

    Args:
        state: the current state (unchanged; a new one is returned).
        metric: the monitored value (anything ``float()`` accepts, e.g. a 0-d array).

    Returns:
        The next :class:`GreedyState`; its ``lr``/``multiplier`` apply from now on.
    """
    current = float(metric)
    window, window_sum = state.window, state.window_sum
    if state.smooth:  # a rolling mean over the last window_size metrics, summed in GreedyLR's order
        window, window_sum = window + (current,), window_sum + current
        if len(window) > state.window_size:
            window_sum -= window[0]
            window = window[1:]
        current = window_sum / len(window)
    new = dict(window=window, window_sum=window_sum, last_epoch=state.last_epoch + 1)
    best, bad, good = state.best, state.num_bad_epochs, state.num_good_epochs
    cooldown_counter, warmup_counter = state.cooldown_counter, state.warmup_counter
    lr, reset_start = state.lr, state.reset_start
    if cooldown_counter > 0:
        cooldown_counter, bad, good = cooldown_counter - 1, 0, 0
    elif warmup_counter > 0:
        warmup_counter, bad, good = warmup_counter - 1, 0, 0
    else:
        if _greedy_is_better(state, current):
            best, bad, good = current, 0, good + 1
        else:
            bad, good = bad + 1, 0
        if good > state.patience:
            raised = min(lr / state.factor, state.max_lr)
            if raised - lr > state.eps:
                _say(state, new["last_epoch"], "increasing", raised)
                lr = raised
            reset_start, warmup_counter, good = state.reset_start_original, state.warmup, 0
        elif bad > state.patience:
            lowered = max(lr * state.factor, state.min_lr)
            if lr - lowered > state.eps:
                _say(state, new["last_epoch"], "reducing", lowered)
                lr = lowered
            cooldown_counter, bad = state.cooldown, 0
            if not lr > state.min_lr:  # a long stay at the floor restarts the schedule
                reset_start -= 1
                if reset_start <= 0:
                    if state.verbose:
                        print("Scheduler reset to initial state.")
                    fresh = greedy_init(state.base_lr, {k: getattr(state, k) for k in _GREEDY_KWARGS if k != "reset_start"})
                    # GreedyLR starts the cooldown after the reduction that triggered the reset.
                    return dataclasses.replace(fresh, reset_start=state.reset_start_original,
                                               reset_start_original=state.reset_start_original,
                                               last_epoch=new["last_epoch"], cooldown_counter=state.cooldown)
    return dataclasses.replace(state, lr=lr, best=best, num_bad_epochs=bad, num_good_epochs=good,
                               cooldown_counter=cooldown_counter, warmup_counter=warmup_counter,
                               reset_start=reset_start, **new)


def _say(state: GreedyState, epoch: int, verb: str, lr: float) -> None:
    if state.verbose:  # GreedyLR(verbose=True) prints each change
        print(f"Epoch {epoch}: {verb} learning rate of group 0 to {lr:.4e}.")


MetricState = PlateauState | GreedyState


def metric_schedule_update(state: MetricState, metric) -> MetricState:
    """Feed one evaluation metric to a metric-driven schedule's state (plateau or greedy)."""
    return greedy_update(state, metric) if isinstance(state, GreedyState) else plateau_update(state, metric)


def _scheduler_name(args) -> str:
    return getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)


def schedule_from_args(args, num_training_steps: int) -> Callable:
    """The step -> multiplier schedule that TrainingArguments describe (lr_scheduler_type, warmup, kwargs).

    For the metric-driven schedules this is the constant 1.0; `metric_schedule_from_args` gives the rest.
    """
    return build_schedule(
        _scheduler_name(args),
        num_training_steps=num_training_steps,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        learning_rate=args.learning_rate,
        scheduler_kwargs=args.lr_scheduler_kwargs or {},
    )


def metric_schedule_from_args(args) -> MetricState | None:
    """The initial state of a metric-driven lr_scheduler_type (reduce_lr_on_plateau, greedy), else None.

    Feed it evaluation metrics with :func:`metric_schedule_update`; its ``multiplier`` scales the lr.
    """
    name = _scheduler_name(args)
    if name not in METRIC_DRIVEN:
        return None
    init = greedy_init if name == SchedulerType.GREEDY.value else plateau_init
    return init(learning_rate=args.learning_rate, scheduler_kwargs=args.lr_scheduler_kwargs or {})


def plateau_from_args(args) -> PlateauState | None:
    """The initial reduce-on-plateau state for lr_scheduler_type="reduce_lr_on_plateau", else None."""
    if _scheduler_name(args) != SchedulerType.REDUCE_ON_PLATEAU.value:
        return None
    return metric_schedule_from_args(args)


METRIC_SCHEDULE_FILE = "metric_schedule.json"


def save_metric_schedule(state: MetricState, directory: str) -> None:
    """Writes a metric-driven schedule's state into a checkpoint directory (backends without scheduler.pt)."""
    import json
    import os

    kind = "greedy" if isinstance(state, GreedyState) else "plateau"
    with open(os.path.join(directory, METRIC_SCHEDULE_FILE), "w") as f:
        json.dump({"kind": kind, "state": dataclasses.asdict(state)}, f)


def load_metric_schedule(current: MetricState, directory: str) -> MetricState:
    """The schedule state saved in `directory`, or `current` when the checkpoint has none (written before)."""
    import json
    import os

    path = os.path.join(directory, METRIC_SCHEDULE_FILE)
    if not os.path.exists(path):
        return current
    with open(path) as f:
        saved = json.load(f)
    kind = GreedyState if saved["kind"] == "greedy" else PlateauState
    if not isinstance(current, kind):
        raise ValueError(
            f"{path} holds a {saved['kind']} schedule but this run's lr_scheduler_type is not; resume with the "
            "lr_scheduler_type the checkpoint was written with."
        )
    fields = saved["state"]
    if kind is GreedyState:
        fields["window"] = tuple(fields["window"])
    return kind(**fields)
