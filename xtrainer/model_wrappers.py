"""Containers that hand non-NNX JAX models to the Trainer (no jax import here).

A Flax NNX module is passed to `Trainer(model=...)` as it is. A linen module comes with its
variables, and a pure functional model with its two functions:

    Trainer(model=LinenModel(module, variables), args=TrainingArguments(..., backend="jax"))
    Trainer(model=FunctionalModel(init_fn, apply_fn), ...)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LinenModel:
    """A flax.linen Module plus its variables ({"params": ..., other collections ...}).

    `module.apply` is called with the batch fields as keyword arguments; a `deterministic` or
    `train` argument of the module's `__call__` is set from the mode, and dropout gets
    `rngs={"dropout": key}`. After training, `variables` holds the trained parameters.
    """

    module: Any
    variables: dict
    method: str | None = None


@dataclass
class FunctionalModel:
    """A pure model: `init_fn(rng) -> params` and `apply_fn(params, inputs, *, rng, train) -> outputs`.

    `outputs` is a scalar loss, a dict with "loss"/"logits", or logits (the trainer then computes
    the loss from `labels`). After training, `params` holds the trained parameters.
    """

    init_fn: Callable | None
    apply_fn: Callable
    params: Any = None
    input_names: list[str] | None = field(default=None)
