"""The learning-rate schedule object the JAX backend hands out as `trainer.lr_scheduler`.

On torch, `trainer.lr_scheduler` is a torch LRScheduler; on jax it is a callable `step -> learning
rate`, usable inside the compiled step (a traced step) and on the host (an int step). The default one
is the shared `xtrainer.schedules` multiplier times `args.learning_rate`; a user may pass any
callable instead (e.g. an optax schedule) through `optimizers=(tx, schedule)` or `create_scheduler`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class LrSchedule:
    """`base_lr * multiplier(step)`: transformers' LambdaLR over an optimizer whose rate is `base_lr`.

    Attributes:
        base_lr: the peak learning rate (args.learning_rate).
        multiplier: step -> factor (xtrainer.schedules; python ints and jax scalars).
        metric_state: the metric-driven (reduce_lr_on_plateau / greedy) state of the run, when one is chosen.
    """

    base_lr: float
    multiplier: Callable
    metric_state: object | None = None

    def __call__(self, step):
        return self.base_lr * self.multiplier(step)
