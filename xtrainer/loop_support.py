"""Small pieces of the training loop that hold no policy: speed metrics, device-side loss tracking,
the in-step callback events, and placing accumulation windows on the device ahead of their step."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def speed_metrics(split: str, start_time: float, num_samples=None, num_steps=None, num_tokens=None) -> dict:
    """Runtime and throughput of a train/eval/predict call, named like transformers' metrics."""
    runtime = time.time() - start_time
    result = {f"{split}_runtime": round(runtime, 4)}
    if runtime == 0:
        return result
    if num_samples is not None:
        result[f"{split}_samples_per_second"] = round(num_samples / runtime, 3)
    if num_steps is not None:
        result[f"{split}_steps_per_second"] = round(num_steps / runtime, 3)
    if num_tokens is not None:
        result[f"{split}_tokens_per_second"] = round(num_tokens / runtime, 3)
    return result


class LossTracker:
    """Per-micro-batch losses kept on device between logs, reduced on the host at log time.

    Reproduces HF's running `tr_loss`, including `logging_nan_inf_filter` (a non-finite loss is
    replaced by the running mean), without reading the device every step.
    """

    def __init__(self, nan_inf_filter: bool):
        self.nan_inf_filter = nan_inf_filter
        self.pending: list[tuple[Any, int]] = []  # (device losses of one step, steps since last log)
        self.total = 0.0  # every drained loss of this train() call

    def add(self, losses, steps_since_log: int) -> None:
        self.pending.append((losses, steps_since_log))

    def drain(self, to_host: Callable) -> float:
        """Sum of the pending losses (a float32 running sum, as in HF), then forget them."""
        if not self.pending:
            return 0.0
        host = to_host([losses for losses, _ in self.pending])
        running = np.float32(0.0)
        for values, (_, steps) in zip(host, self.pending):
            for value in np.atleast_1d(np.asarray(values, dtype=np.float32)):
                if self.nan_inf_filter and not np.isfinite(value):
                    running = running + running / np.float32(1 + steps)
                else:
                    running = running + value
        self.pending = []
        self.total += float(running)
        return float(running)


class StepEvents:
    """The callback events inside an optimizer step, handed to the backend to fire (base.StepEvents)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def _fire(self, event: str) -> None:
        t = self.trainer
        t.control = getattr(t.callback_handler, event)(t.args, t.state, t.control)

    def substep_end(self) -> None:
        self._fire("on_substep_end")

    def pre_optimizer_step(self) -> None:
        self._fire("on_pre_optimizer_step")

    def optimizer_step(self) -> None:
        self._fire("on_optimizer_step")


#: Accumulation windows placed on the device ahead of the step that uses them. Two keep the device
#: fed across one slow batch (a worker hiccup, a long transfer) at the cost of two windows of memory.
DEVICE_PREFETCH_DEPTH = 2


def prefetch_to_device(windows, shard_window, depth: int = DEVICE_PREFETCH_DEPTH):
    """Yields (window, num_items, device_window), with up to `depth` later windows already sent to the device.

    The transfers of windows N+1..N+depth are started before step N is dispatched, so on asynchronous
    backends (JAX, CUDA with pinned memory) they overlap with step N's compute instead of following
    it; nothing here waits for the device.
    """
    from collections import deque

    ahead: deque = deque()
    for window, num_items in windows:
        ahead.append((window, num_items, shard_window(window)))
        if len(ahead) > depth:
            yield ahead.popleft()
    while ahead:
        yield ahead.popleft()


def prefetch_one(windows, shard_window):
    """prefetch_to_device with one window ahead."""
    return prefetch_to_device(windows, shard_window, depth=1)
