"""skip_memory_metrics=False: the `*_mem_*` metrics transformers adds to init, train, eval and predict results.

For each stage (`init`, `train`, `eval`, `test`):

- `{stage}_mem_cpu_alloc_delta` / `{stage}_mem_cpu_peaked_delta`: the process's resident memory (RSS) at the
  end minus at the start, and the highest RSS seen during the stage above the end value. The peak comes
  from a thread sampling every few milliseconds, so a short spike between samples can be missed.
- torch on CUDA: `{stage}_mem_gpu_alloc_delta` / `{stage}_mem_gpu_peaked_delta` from torch.cuda's allocator.
- jax: `{stage}_mem_device_alloc_delta` / `{stage}_mem_device_peaked_delta` summed over this process's
  devices' memory_stats() (accelerators report them; XLA:CPU devices report none, and then only the CPU
  figures appear).

Stages do not nest: an evaluation inside train() is counted in train's figures, as in transformers. The
init figures are added to the first stage that reports.
"""

from __future__ import annotations

import threading
from typing import Any

from ..extras import require

_STAGES = {"__init__": "init", "train": "train", "_inner_training_loop": "train", "evaluate": "eval",
           "predict": "test"}


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class MemoryTracker:
    """Measures the stages of one Trainer (see the module docstring).

    Args:
        backend: the Trainer's backend ("torch" / "torch_xla" read torch.cuda, "jax" its devices).
        skip: args.skip_memory_metrics (True measures nothing).
    """

    def __init__(self, backend: Any, skip: bool = True):
        self.backend = backend
        self.skip = skip
        self.stage: str | None = None
        self.init_reported = False
        self.init_metrics: dict[str, int] = {}
        self._sampler: threading.Thread | None = None
        self._sampling = False
        if not skip:
            require("psutil", "memory", "skip_memory_metrics=False")  # fails here, before any training

    # ------------------------------------------------------------------ accelerator memory

    def _device_memory(self) -> tuple[str, int, int] | None:
        """(kind, bytes in use, peak bytes in use) of this process's accelerators, or None."""
        name = getattr(self.backend, "name", "")
        if name == "jax":
            import jax

            stats = [d.memory_stats() for d in jax.local_devices()]
            if not stats or any(s is None for s in stats):
                return None
            return ("device", sum(s.get("bytes_in_use", 0) for s in stats),
                    sum(s.get("peak_bytes_in_use", s.get("bytes_in_use", 0)) for s in stats))
        import torch

        if torch.cuda.is_available():
            return "gpu", torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        return None

    def _reset_device_peak(self) -> None:
        if getattr(self.backend, "name", "") != "jax":
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

    # ------------------------------------------------------------------ stages

    def _sample(self) -> None:
        import time

        while self._sampling:
            self._cpu_peak = max(self._cpu_peak, _rss())
            time.sleep(0.005)

    def start(self, caller: str) -> None:
        """Starts measuring the stage of `caller` (ignored while another stage runs)."""
        if self.skip or self.stage is not None:
            return
        self.stage = _STAGES[caller]
        self._reset_device_peak()
        device = self._device_memory()
        self._device_start = device[1] if device else None
        self._cpu_start = self._cpu_peak = _rss()
        self._sampling = True
        self._sampler = threading.Thread(target=self._sample, daemon=True, name="xtrainer-memory")
        self._sampler.start()

    def stop(self, caller: str) -> dict[str, int]:
        """Stops the stage of `caller`; returns its metrics (empty when it was not the outer stage)."""
        if self.skip or self.stage != _STAGES[caller]:
            return {}
        self._sampling = False
        self._sampler.join()
        end = _rss()
        stage, self.stage = self.stage, None
        metrics = {f"{stage}_mem_cpu_alloc_delta": end - self._cpu_start,
                   f"{stage}_mem_cpu_peaked_delta": max(0, self._cpu_peak - end)}
        device = self._device_memory()
        if device is not None and self._device_start is not None:
            kind, used, peak = device
            metrics[f"{stage}_mem_{kind}_alloc_delta"] = used - self._device_start
            metrics[f"{stage}_mem_{kind}_peaked_delta"] = max(0, peak - used)
        if stage == "init":
            self.init_metrics = metrics
        return metrics

    def stop_and_update_metrics(self, caller: str, metrics: dict) -> None:
        """Adds the stage's metrics (and, the first time, init's) to `metrics`."""
        if self.skip:
            return
        metrics.update(self.stop(caller))
        if not self.init_reported and self.init_metrics:
            metrics.update(self.init_metrics)
            self.init_reported = True
