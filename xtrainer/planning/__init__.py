"""Ahead-of-time planning of TPU runs: compile the real train step for a TPU preset on this machine.

`plan(model, args, "v5p-128")` (also `Trainer.plan` and `xtrainer plan`) returns a `PlanReport`:
memory, FLOPs, collectives and shardings per device, and a roofline step-time estimate. Needs libtpu:
`pip install 'xtrainer[plan]'`.

Names are imported on first use, so that torch-only installs (which use `planning.memory` to
recognise out-of-memory errors) never import jax.
"""

import importlib

_EXPORTS = {
    "plan": "planner", "largest_fitting_batch": "planner", "batch_signature": "planner", "causal_lm_batch": "planner",
    "PlanReport": "report", "TensorPlan": "report",
    "StepDoesNotFit": "memory", "StepMemory": "memory",
    "PlanDependencyError": "topology", "require_libtpu": "topology", "topology_devices": "topology",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
