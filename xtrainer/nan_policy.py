"""`nan_policy`: what training does when a step's loss or gradient norm is not finite (front side).

The backends compute an on-device "finite" flag in every train step (from the window's loss and
the pre-clipping gradient global norm) and keep three device counters for the run:

    skipped    steps whose update was not applied,
    first_bad  the index (1-based, counted from the start of this `train()` call) of the first step
               with a non-finite value, 0 when there was none,
    metric     which value was non-finite first: 1 = loss, 2 = grad_norm.

They come back with each step's metrics (`StepMetrics.nonfinite`) and stay on device; this module
reads them only when a log is written and at the end of training, so neither policy adds a host
sync to the step. Policies:

- "ignore" (default): nothing is checked; NaN/inf flow into the weights (HF's behaviour).
  `logging_nan_inf_filter` still controls how non-finite losses enter the logged average.
- "skip": a step with a non-finite value leaves the parameters, optimizer state and (fp16) loss
  scale as they were; the cumulative count of skipped steps of this run is logged as
  `nan_skipped_steps`. The global step and the learning-rate schedule still advance (the skipped
  step counts as a step, like a batch the data pipeline dropped), so `max_steps`, the schedule and
  the logging/eval/save strategies keep their meaning.
- "raise": from the first non-finite step on, no update is applied (the weights stay those from
  just before it), and the next log (every `logging_steps`, and at the end of training) raises
  `NonFiniteTrainingError` naming that step and the metric. With logging_steps > 1 the error comes
  at the next logging step, not at the bad step itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

NAN_POLICIES = ("raise", "skip", "ignore")
METRIC_NAMES = {1: "loss", 2: "grad_norm"}
#: keys of the device counters a backend reports in StepMetrics.nonfinite
COUNTER_KEYS = ("skipped", "first_bad", "metric")


class NonFiniteTrainingError(FloatingPointError):
    """Raised under nan_policy="raise": the first step whose loss or grad_norm was NaN/inf.

    Attributes:
        step: the global step (as in log_history) of the first non-finite value.
        metric: "loss" or "grad_norm".
    """

    def __init__(self, step: int, metric: str):
        self.step, self.metric = step, metric
        super().__init__(
            f"Non-finite {metric} (NaN or inf) at step {step}; training stopped (nan_policy='raise'). The weights are "
            f"those from before step {step}. To fix it: lower the learning_rate, train in bf16 instead of fp16, clip "
            "gradients with max_grad_norm, check the batch of that step for NaN/inf inputs, or set nan_policy='skip' "
            "to skip such updates and keep training."
        )


def check_policy(value: Any) -> str | None:
    """An error message when `value` is not a valid nan_policy, else None."""
    if value not in NAN_POLICIES:
        return f"`nan_policy`={value!r} is not supported; choose one of: {', '.join(map(repr, NAN_POLICIES))}."
    return None


class NanMonitor:
    """Reads a backend's non-finite counters at log time and applies the policy.

    Args:
        policy: "raise", "skip" or "ignore".
        start_step: the global step when this train() call started (device counters start at 0 there).
        on_raise: called before raising (e.g. to hand the clean weights back to the user's model).
    """

    def __init__(self, policy: str, start_step: int, on_raise: Callable[[], Any] | None = None):
        self.policy = policy
        self.start_step = start_step
        self.on_raise = on_raise
        self._latest = None  # device counters of the newest step (a reference; nothing is read)

    def observe(self, metrics: Any) -> None:
        """Keeps the step's device counters; no device read."""
        counters = getattr(metrics, "nonfinite", None)
        if counters is not None:
            self._latest = counters

    def report(self, logs: dict | None, to_host: Callable) -> None:
        """At a log (logs is the dict being written) or at the end (logs=None): one device read.

        Raises:
            NonFiniteTrainingError: under nan_policy="raise", if a step was non-finite.
        """
        if self.policy == "ignore" or self._latest is None:
            return
        host = to_host(self._latest)
        if self.policy == "raise" and int(host["first_bad"]) > 0:
            if self.on_raise is not None:
                self.on_raise()
            raise NonFiniteTrainingError(self.start_step + int(host["first_bad"]), METRIC_NAMES[int(host["metric"])])
        if self.policy == "skip" and logs is not None:
            logs["nan_skipped_steps"] = int(host["skipped"])
