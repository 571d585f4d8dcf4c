"""nan_policy "skip" / "raise" for the torch backends (torch and torch_xla), without a host sync.

Each step computes a device flag `apply` (the window's loss and the gradient global norm are
finite; under "raise", also no earlier step was bad) and updates the run's device counters (see
xtrainer/nan_policy.py). The optimizer update is then made conditional on the flag without reading
it on the host:

- optimizers with torch's AMP step support (the fused AdamW/Adam/SGD/Adagrad kernels, e.g. the
  default `adamw_torch_fused`) take the flag as their `found_inf` input, which makes the kernel
  leave parameters, moments and step counts untouched;
- any other optimizer runs normally and is then undone with `torch.where` from a copy of the
  parameters and optimizer state taken before it (one extra copy per step; prefer a fused
  optimizer). State the optimizer creates lazily on a skipped first step is reset to zeros (Adam
  moments, step counts). Host-resident scalars (Adam's `step` on CUDA without capturable/fused)
  cannot be selected without a sync and still count the skipped step.
- fp16 with a GradScaler: the scaler already skips updates whose gradients are not finite; only a
  non-finite *loss* counts as a bad step, and then the scaler's scale and growth tracker are put
  back, so a bad batch does not lower the loss scale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch


class NanGuard:
    """The torch side of nan_policy (see the module docstring).

    Args:
        policy: "skip" or "raise".
        device: where the counters live (the parameters' device).
        loss_scaling: True with an fp16 GradScaler.
    """

    def __init__(self, policy: str, device: torch.device, loss_scaling: bool = False):
        self.policy = policy
        self.loss_scaling = loss_scaling
        zero = torch.zeros((), dtype=torch.int32, device=device)
        self.counters = {"calls": zero, "skipped": zero, "first_bad": zero, "metric": zero}

    def update(self, losses: Sequence[torch.Tensor], grad_norm: torch.Tensor) -> torch.Tensor:
        """Updates the counters for one step; returns the device bool `apply` (all device ops)."""
        c = self.counters
        loss_ok = torch.isfinite(torch.stack([loss.reshape(()) for loss in losses]).sum()).to(c["calls"].device)
        finite = loss_ok if self.loss_scaling else loss_ok & torch.isfinite(grad_norm).to(loss_ok.device)
        calls = c["calls"] + 1
        clean_so_far = c["first_bad"] == 0
        # "raise" freezes the weights from the first bad step on, so they are clean when the error comes.
        apply = finite & clean_so_far if self.policy == "raise" else finite
        newly_bad = ~finite & clean_so_far
        metric = torch.where(loss_ok, torch.full_like(calls, 2), torch.full_like(calls, 1))
        # New tensors each step (no in-place ops): metrics of earlier steps keep their values.
        self.counters = {
            "calls": calls,
            "skipped": c["skipped"] + (~apply).to(torch.int32),
            "first_bad": torch.where(newly_bad, calls, c["first_bad"]),
            "metric": torch.where(newly_bad, metric, c["metric"]),
        }
        return apply

    def report(self) -> dict[str, torch.Tensor]:
        """The counters the front reads at log time (StepMetrics.nonfinite)."""
        return {k: v for k, v in self.counters.items() if k != "calls"}

    @contextlib.contextmanager
    def guarded_step(self, optimizer: torch.optim.Optimizer, apply: torch.Tensor, scaler=None):
        """Runs the optimizer step (and scaler update) inside; leaves everything as it was unless `apply`."""
        if scaler is not None:
            saved = [t.clone() for t in _scaler_tensors(scaler)]
            yield
            for tensor, old in zip(_scaler_tensors(scaler), saved):
                tensor.copy_(torch.where(apply.to(tensor.device), tensor, old))
            return
        if getattr(optimizer, "_step_supports_amp_scaling", False) and _all_fused(optimizer):
            optimizer.grad_scale = None
            optimizer.found_inf = (~apply).to(torch.float32)
            try:
                yield
            finally:
                del optimizer.found_inf, optimizer.grad_scale
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        before = {id(p): (p.detach().clone(), _state_tensors(optimizer, p, clone=True)) for p in params}
        yield
        with torch.no_grad():
            for p in params:
                old_param, old_state = before[id(p)]
                keep = apply.to(p.device)
                p.copy_(torch.where(keep, p, old_param))
                for key, value in _state_tensors(optimizer, p).items():
                    if value.device != keep.device:
                        continue  # a host-side counter: selecting it would need a device read
                    old = old_state.get(key)
                    value.copy_(torch.where(keep, value, old if old is not None else torch.zeros_like(value)))


def _all_fused(optimizer) -> bool:
    # Only the fused kernels honour found_inf; a foreach/for-loop group would ignore it.
    return all(group.get("fused") for group in optimizer.param_groups)


def _state_tensors(optimizer, param, clone: bool = False) -> dict[str, torch.Tensor]:
    state = optimizer.state.get(param, {})
    return {k: (v.clone() if clone else v) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _scaler_tensors(scaler) -> list[torch.Tensor]:
    return [t for t in (getattr(scaler, "_scale", None), getattr(scaler, "_growth_tracker", None)) if t is not None]


def make_nan_guard(args, device: torch.device, loss_scaling: bool = False) -> NanGuard | None:
    """A NanGuard for args.nan_policy "skip"/"raise", None for "ignore" (nothing is checked)."""
    policy = getattr(args, "nan_policy", "ignore")
    return None if policy == "ignore" else NanGuard(policy, device, loss_scaling)
