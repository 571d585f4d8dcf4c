"""`skip_memory_metrics=False`: the `*_mem_*` metrics of transformers' Trainer.

Each stage (`init` = building the Trainer, `train`, `eval`, `test` = predict) reports

    {stage}_mem_cpu_alloc_delta    resident memory (RSS) of this process at the end minus at the start
    {stage}_mem_cpu_peaked_delta   how far RSS rose above its end value during the stage (never negative)
    {stage}_mem_gpu_alloc_delta    the same for the accelerator memory, where the runtime reports it
    {stage}_mem_gpu_peaked_delta

in the metrics the stage returns (train: in the logged train metrics too, as in transformers). The
`init` figures, plus `before_init_mem_cpu` / `before_init_mem_gpu` (bytes in use when the Trainer
started), are added to the first stage that reports. An evaluation inside `train()` is counted in
`train`, not reported on its own (the stages do not nest, as in transformers).

What "gpu" measures on each backend (the backend's `memory_probe` picks the probe):
- torch: the CUDA caching allocator of this process's device (`torch.cuda.memory_allocated`, its peak
  reset at each stage start), as in transformers; no figures on CPU-only runs.
- jax: `memory_stats()` of this process's devices, summed (`bytes_in_use`, `peak_bytes_in_use`).
  Their peak cannot be reset: it is exact when the stage set a new peak, else the highest value the
  sampling thread saw. JAX's CPU devices report no statistics, so a CPU run has CPU figures only.
- torch_xla: `xm.get_memory_info` of the XLA device (`bytes_used`, `peak_bytes_used`, same peak rule as
  jax) on TPUs; the PJRT CPU device does not implement it, so there a run has CPU figures only.
When a backend's devices report nothing, one warning says so and only the CPU figures are reported.

RSS comes from psutil (`pip install 'xtrainer[memory]'`). The peaks are sampled every millisecond by
a daemon thread, so a very short spike can be missed (transformers' tracker has the same limit).
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any, NamedTuple, Protocol

from ..extras import require

logger = logging.getLogger(__name__)

STAGES = ("init", "train", "eval", "test")
_SAMPLE_INTERVAL_S = 0.001


class DeviceReading(NamedTuple):
    in_use: int  # bytes
    peak: int | None  # bytes; since the last reset_peak where the runtime allows one, else since start


class MemoryProbe(Protocol):
    """Reads a backend's accelerator memory (see the module docstring for what each backend reads)."""

    #: what is read, for messages ("CUDA device cuda:0", "2 JAX devices", ...)
    description: str
    #: whether reset_peak() really resets the runtime's peak counter
    resettable_peak: bool

    def read(self) -> DeviceReading | None:
        """Bytes in use now and the peak, or None when the runtime reports nothing (yet)."""

    def reset_peak(self) -> None: ...

    def settle(self) -> None:
        """Returns cached-but-free memory to the device, so in_use means live arrays (CUDA's empty_cache)."""


class CudaMemoryProbe:
    """torch's CUDA caching allocator on one device (transformers' readings)."""

    resettable_peak = True

    def __init__(self, device):
        self.device = device
        self.description = f"CUDA device {device}"

    def read(self) -> DeviceReading | None:
        import torch

        return DeviceReading(torch.cuda.memory_allocated(self.device), torch.cuda.max_memory_allocated(self.device))

    def reset_peak(self) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats(self.device)

    def settle(self) -> None:
        import torch

        torch.cuda.empty_cache()


class JaxMemoryProbe:
    """`Device.memory_stats()` of this process's JAX devices, summed."""

    resettable_peak = False

    def __init__(self, devices=None):
        self._devices = devices

    def _local_devices(self):
        if self._devices is None:
            import jax

            self._devices = jax.local_devices()
        return self._devices

    @property
    def description(self) -> str:
        devices = self._local_devices()
        return f"{len(devices)} JAX {devices[0].platform} device(s)" if devices else "no JAX device"

    def read(self) -> DeviceReading | None:
        in_use = peak = 0
        for device in self._local_devices():
            stats = device.memory_stats()
            if not stats or "bytes_in_use" not in stats:
                return None
            in_use += int(stats["bytes_in_use"])
            peak += int(stats.get("peak_bytes_in_use", stats["bytes_in_use"]))
        return DeviceReading(in_use, peak)

    def reset_peak(self) -> None:  # JAX has no way to reset it; the tracker samples instead
        return None

    def settle(self) -> None:
        return None


class XlaMemoryProbe:
    """`xm.get_memory_info` of the torch_xla device, read only once the backend has set up its device
    (touching the XLA device earlier would start the runtime before SPMD is enabled)."""

    resettable_peak = False
    description = "the torch_xla device"

    def __init__(self, device_ready):
        self._device_ready = device_ready  # () -> the XLA device, or None before the backend's prepare
        self._unsupported = False

    def read(self) -> DeviceReading | None:
        device = None if self._unsupported else self._device_ready()
        if device is None:
            return None
        import torch_xla.core.xla_model as xm

        try:
            info = xm.get_memory_info(device)
        except RuntimeError:  # the PJRT CPU device: "GetAllocatorStats is not supported"
            self._unsupported = True
            return None
        used = int(info.get("bytes_used", 0))
        return DeviceReading(used, int(info.get("peak_bytes_used", used)))

    def reset_peak(self) -> None:
        return None

    def settle(self) -> None:
        return None


class _Stage:
    """One stage in progress: the readings at its start and a thread sampling the peaks."""

    def __init__(self, name: str, process, probe: MemoryProbe | None):
        self.name, self.process, self.probe = name, process, probe
        self.running = True
        gc.collect()
        if probe is not None:
            probe.settle()
            probe.reset_peak()
        self.device_begin = probe.read() if probe is not None else None
        self.cpu_begin = self.cpu_peak = process.memory_info().rss
        self.device_sampled_peak = self.device_begin.in_use if self.device_begin is not None else 0
        self.thread = threading.Thread(target=self._sample, name=f"xtrainer-memory-{name}", daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        sample_device = self.probe is not None and not self.probe.resettable_peak and self.device_begin is not None
        stop = threading.Event()
        while self.running:
            self.cpu_peak = max(self.cpu_peak, self.process.memory_info().rss)
            if sample_device:
                reading = self.probe.read()
                if reading is not None:
                    self.device_sampled_peak = max(self.device_sampled_peak, reading.in_use)
            stop.wait(_SAMPLE_INTERVAL_S)  # sleeps without holding the GIL, unlike a busy loop

    def finish(self) -> dict[str, dict[str, int]]:
        """Stops sampling; returns {"cpu": {...}, "gpu": {...}} with begin/end/alloc/peaked in bytes."""
        self.running = False
        self.thread.join()
        gc.collect()
        cpu_end = self.process.memory_info().rss
        self.cpu_peak = max(self.cpu_peak, cpu_end)
        result = {"cpu": {"begin": self.cpu_begin, "end": cpu_end, "alloc": cpu_end - self.cpu_begin,
                          "peaked": max(0, self.cpu_peak - cpu_end)}}
        if self.probe is not None:
            self.probe.settle()
            end = self.probe.read()
            if self.device_begin is not None and end is not None:
                peak = self._device_peak(end)
                result["gpu"] = {"begin": self.device_begin.in_use, "end": end.in_use,
                                 "alloc": end.in_use - self.device_begin.in_use, "peaked": max(0, peak - end.in_use)}
        return result

    def _device_peak(self, end: DeviceReading) -> int:
        if self.probe.resettable_peak and end.peak is not None:
            return end.peak
        peak = max(self.device_sampled_peak, end.in_use)
        if end.peak is not None and self.device_begin.peak is not None and end.peak > self.device_begin.peak:
            peak = max(peak, end.peak)  # the runtime's peak rose during this stage, so it is this stage's peak
        return peak


class MemoryTracker:
    """transformers' TrainerMemoryTracker, with the stage named by the caller.

    Example:
        >>> tracker = MemoryTracker(skip=False, probe=None)
        >>> tracker.start("train")
        >>> metrics = {"train_runtime": 1.0}
        >>> tracker.stop_and_update_metrics("train", metrics)   # adds init_* and train_mem_cpu_* keys
    """

    def __init__(self, skip: bool, probe: MemoryProbe | None = None, backend_name: str = ""):
        self.skip = skip
        self.probe = probe
        self.current: _Stage | None = None
        self.results: dict[str, dict[str, dict[str, int]]] = {}
        self.init_reported = False
        self._said_no_device = False
        self.backend_name = backend_name
        if skip:
            return
        psutil = require("psutil", "memory", "skip_memory_metrics=False")
        self.process = psutil.Process()

    def start(self, stage: str) -> None:
        """Starts measuring `stage`; a stage started while another runs (eval inside train) is ignored."""
        if self.skip or (self.current is not None and self.current.name != stage):
            return
        if self.current is not None:  # the same stage again: start over
            self.current.running = False
            self.current.thread.join()
        self.current = _Stage(stage, self.process, self.probe)

    def stop(self, stage: str) -> None:
        if self.skip or self.current is None or self.current.name != stage:
            return
        self.results[stage] = self.current.finish()
        self.current = None
        if "gpu" not in self.results[stage]:
            self._say_no_device_once()

    def _say_no_device_once(self) -> None:
        if self._said_no_device or self.probe is None:  # no probe: no accelerator to report (a CPU torch run)
            return
        self._said_no_device = True
        what = self.probe.description if self.probe is not None else "its devices"
        logger.warning(
            "skip_memory_metrics=False on backend=%r: the runtime reports no memory statistics for %s, so only "
            "the *_mem_cpu_* metrics (this process's RSS) are reported.", self.backend_name, what)

    def update_metrics(self, stage: str, metrics: dict) -> None:
        """Adds the `stage` figures (and, the first time, the `init` ones) to `metrics`."""
        if self.skip or self.current is not None:  # a nested stage's caller: the outer stage reports
            return
        stages = [stage]
        if not self.init_reported and "init" in self.results and stage != "init":
            stages.insert(0, "init")
            self.init_reported = True
        for name in stages:
            for kind, figures in self.results.get(name, {}).items():
                for what in ("alloc", "peaked"):
                    metrics[f"{name}_mem_{kind}_{what}_delta"] = figures[what]
        if stages[0] == "init":
            for kind, figures in self.results["init"].items():
                metrics[f"before_init_mem_{kind}"] = figures["begin"]

    def stop_and_update_metrics(self, stage: str, metrics: dict | None = None) -> None:
        if self.skip or self.current is None or self.current.name != stage:
            return
        self.stop(stage)
        if metrics is not None:
            self.update_metrics(stage, metrics)


def build_memory_tracker(skip: bool, backend: Any, args: Any) -> MemoryTracker:
    """The Trainer's tracker: `skip_memory_metrics` on the backend's device probe (its `memory_probe`)."""
    if skip:
        return MemoryTracker(skip=True)
    return MemoryTracker(skip=False, probe=backend.memory_probe(args), backend_name=backend.name)


__all__ = [
    "CudaMemoryProbe",
    "DeviceReading",
    "JaxMemoryProbe",
    "MemoryProbe",
    "MemoryTracker",
    "STAGES",
    "XlaMemoryProbe",
    "build_memory_tracker",
]
