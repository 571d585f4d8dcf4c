"""The accelerate-shaped members of transformers' Trainer, and what they mean in xtrainer.

transformers' Trainer runs through an accelerate `Accelerator`; xtrainer's loop and data pipeline do not
(the backends place and shard everything). Scripts and libraries still reach for it, mostly for the
process layout and a few helpers, so `trainer.accelerator` is an `AcceleratorView`: it answers those
from the backend, and any other attribute raises an AttributeError that says why there is none.

- `create_accelerator_and_postprocess()` builds the view and sets the flags transformers sets there
  (`is_deepspeed_enabled` False: DeepSpeed does not run in xtrainer; `is_fsdp_enabled` from the backend).
- `end()` ends the run's distributed runtime: torch.distributed's process group (torchrun) or
  jax.distributed (multi-host JAX), as accelerate's `end_training` does; a no-op in one process.
- `get_cp_size()` / `get_sp_size()`: 1, context and sequence parallelism (accelerate's
  ParallelismConfig, DeepSpeed Ulysses) do not exist in xtrainer. `get_tp_size()`: the model's own
  `_tp_size` (transformers' tensor-parallel loading) if set, else the `tensor` axis of the device mesh on
  jax / torch_xla, else 1.
"""

from __future__ import annotations

import sys
from typing import Any

_WHY = ("xtrainer does not run accelerate: its backends place, shard and synchronise the model themselves "
        "(the loop is xtrainer/trainer.py). trainer.accelerator offers is_main_process, is_local_main_process, "
        "process_index, local_process_index, num_processes, device, unwrap_model, wait_for_everyone, print, "
        "gather_for_metrics and end_training.")


class AcceleratorView:
    """`trainer.accelerator`: the parts of accelerate's Accelerator that have a meaning here.

    Example:
        >>> trainer.accelerator.is_main_process, trainer.accelerator.num_processes
        (True, 1)
    """

    #: accelerate's parallelism_config (context / tensor / sequence parallel plugins): none here.
    parallelism_config = None
    #: accelerate's DeepSpeed and FSDP plugins live on its state; xtrainer has no such state.
    state = None

    def __init__(self, trainer: Any):
        self._trainer = trainer

    @property
    def _backend(self):
        return self._trainer.backend

    @property
    def num_processes(self) -> int:
        return self._backend.num_processes

    @property
    def process_index(self) -> int:
        return self._backend.process_index

    @property
    def local_process_index(self) -> int:
        return self._trainer.args.local_process_index

    @property
    def is_main_process(self) -> bool:
        return self._backend.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        return self._trainer.args.local_process_index == 0

    @property
    def device(self):
        """The torch device of the run (transformers' args.device); for jax, the first local JAX device."""
        return self._trainer.args.device

    def unwrap_model(self, model: Any, keep_fp32_wrapper: bool = True, keep_torch_compile: bool = True) -> Any:
        """The model without DDP / torch.compile wrappers (FSDP2 shards in place: nothing to unwrap)."""
        while True:
            inner = getattr(model, "module", None)  # DistributedDataParallel, DataParallel
            if inner is None and not keep_torch_compile:
                inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
            if inner is None:
                return model
            model = inner

    def wait_for_everyone(self) -> None:
        self._backend.barrier()

    def print(self, *args, **kwargs) -> None:
        if self.is_local_main_process:
            print(*args, **kwargs)

    def gather_for_metrics(self, input_data: Any, use_gather_object: bool = False) -> Any:
        """Returned as it is: xtrainer evaluates the whole eval set on every process, nothing to gather."""
        return input_data

    def end_training(self) -> None:
        end_distributed()

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"trainer.accelerator has no {name!r}: {_WHY}")

    def __repr__(self) -> str:
        return f"AcceleratorView(backend={self._backend.name!r}, num_processes={self.num_processes})"


def end_distributed() -> None:
    """Shuts down the distributed runtime this process joined (torch.distributed or jax.distributed)."""
    torch_dist = sys.modules.get("torch.distributed")
    if torch_dist is not None and torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        jax.distributed.shutdown()


def tensor_parallel_size(trainer: Any) -> int:
    """get_tp_size: the model's `_tp_size`, else the mesh's tensor axis (jax, torch_xla), else 1."""
    model_tp = getattr(trainer.model, "_tp_size", None)
    if model_tp is not None:
        return int(model_tp)
    mesh_config = getattr(trainer.backend, "mesh_config", None)
    return int(getattr(mesh_config, "tensor", 1)) if mesh_config is not None else 1


__all__ = ["AcceleratorView", "end_distributed", "tensor_parallel_size"]
