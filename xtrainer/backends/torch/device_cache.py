"""TrainingArguments.torch_empty_cache_steps: hand the accelerator allocator's cached blocks back every N steps.

transformers empties the device cache after each micro-batch's forward pass while the number of
finished optimizer steps is a multiple of N (so at step 0 too, and for every micro-batch of such a
window); this does the same. Emptying the cache lowers the peak reserved memory of runs whose
allocations fragment, at the price of slower steps. A CPU run has no such cache: it is told so once.
"""

from __future__ import annotations

import json
import logging
import os

import torch

logger = logging.getLogger(__name__)


def clear_device_cache(device: torch.device) -> None:
    """Releases the cached, unused memory of the allocator behind `device` (CUDA/ROCm, XPU, MPS, NPU)."""
    kind = device.type
    if kind == "cuda":
        torch.cuda.empty_cache()
    elif kind == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.empty_cache()
    elif kind == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()
        if hasattr(torch.mps, "clear_graph_cache"):
            torch.mps.clear_graph_cache()
    elif kind == "npu" and hasattr(torch, "npu"):
        torch.npu.empty_cache()


class CacheEmptier:
    """Calls `clear_device_cache` after a micro-batch's forward pass when `steps_done % every == 0`.

    Args:
        every: args.torch_empty_cache_steps (None or 0: never).
        device: the device the steps run on.
    """

    def __init__(self, every: int | None, device: torch.device):
        self.every = int(every) if every else None
        self.device = device
        self.steps_done = 0  # optimizer steps finished in this run (transformers' state.global_step)
        if self.every and device.type == "cpu":
            logger.warning(
                "torch_empty_cache_steps=%d does nothing on CPU: there is no accelerator memory cache to empty "
                "(it applies to CUDA/ROCm, XPU, MPS and NPU devices).", self.every,
            )

    def after_forward(self) -> None:
        if self.every and self.steps_done % self.every == 0:
            clear_device_cache(self.device)

    def after_optimizer_step(self) -> None:
        self.steps_done += 1

    def resume_from(self, checkpoint_dir: str) -> None:
        """Continues the step count of a checkpoint (its trainer_state.json), as transformers' global_step does."""
        path = os.path.join(checkpoint_dir, "trainer_state.json")
        if os.path.isfile(path):
            with open(path) as f:
                self.steps_done = int(json.load(f).get("global_step", 0))
