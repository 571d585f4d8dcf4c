"""What a run's arguments say about this process: its place among the processes, its torch device, and a
barrier across processes.

`TrainingArguments` exposes these under transformers' names (`world_size`, `process_index`,
`local_process_index`, `device`, `n_gpu`, `parallel_mode`, `main_process_first()`), which transformers'
example scripts read before any Trainer exists. The answer depends on the backend the arguments ask for:
torch-family backends run one process per device under torchrun (RANK / WORLD_SIZE / LOCAL_RANK); JAX runs
one process per host that drives all the host's devices (JAX_NUM_PROCESSES / JAX_PROCESS_ID, or a running
jax.distributed).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from .trainer_utils import ParallelMode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessLayout:
    """This process's place in the run."""

    world_size: int = 1
    process_index: int = 0
    local_process_index: int = 0


def backend_family(args: Any) -> str:
    """"jax", "torch" or "torch_xla": the backend `args.backend` names, with "auto" resolved as far as the
    arguments allow (without the model): a JAX multi-host setup means jax, a TPU host with torch_xla means
    torch_xla, anything else torch (transformers scripts train torch models)."""
    backend = str(getattr(args, "backend", "auto") or "auto")
    if backend != "auto":
        return backend
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "jax"
    from .backends.registry import detect_accelerator

    if importlib.util.find_spec("torch_xla") is not None and detect_accelerator() == "tpu":
        return "torch_xla"
    return "torch"


def _jax_distributed_running() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import distributed

        return distributed.global_state.client is not None
    except Exception:  # a jax without this private module: fall back to the environment
        return False


def process_layout(args: Any) -> ProcessLayout:
    """World size, global and local index of this process."""
    local_default = getattr(args, "local_rank", -1)
    local = int(os.environ.get("LOCAL_RANK", local_default if local_default != -1 else 0))
    if backend_family(args) == "jax":
        if _jax_distributed_running():
            import jax

            return ProcessLayout(jax.process_count(), jax.process_index(), local)
        return ProcessLayout(int(os.environ.get("JAX_NUM_PROCESSES", 1)), int(os.environ.get("JAX_PROCESS_ID", 0)), local)
    return ProcessLayout(int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), local)


def torch_device(args: Any):
    """The torch device of this process (what `TrainingArguments.device` returns).

    torch: the process's CUDA device (cuda:LOCAL_RANK), or the CPU with use_cpu / no GPU. torch_xla: the XLA
    device. jax: the CPU - a torch module is handed to JAX (torchax) from host memory and the mesh places
    it, so `model.to(args.device)` in a transformers script is harmless. Without torch installed: "cpu".
    """
    if importlib.util.find_spec("torch") is None:
        return "cpu"
    import torch

    family = backend_family(args)
    if family == "torch_xla":
        import torch_xla.core.xla_model as xm

        return xm.xla_device()
    if family == "jax" or getattr(args, "use_cpu", False) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", process_layout(args).local_process_index)


def gpus_used(args: Any) -> int:
    """transformers' `n_gpu`: GPUs this process drives (xtrainer never runs nn.DataParallel, so at most 1 on
    torch; on jax the process's local GPU devices)."""
    family = backend_family(args)
    if family == "jax":
        if getattr(args, "use_cpu", False) or "jax" not in sys.modules and importlib.util.find_spec("jax") is None:
            return 0
        import jax

        return jax.local_device_count() if jax.default_backend() == "gpu" else 0
    if family == "torch_xla":
        return 0
    device = torch_device(args)
    return 1 if getattr(device, "type", "cpu") == "cuda" else 0


def parallel_mode(args: Any) -> ParallelMode:
    """transformers' ParallelMode: TPU for torch_xla, DISTRIBUTED with several processes, NOT_DISTRIBUTED for
    one JAX process driving several devices, else NOT_PARALLEL."""
    family = backend_family(args)
    if family == "torch_xla":
        return ParallelMode.TPU
    if process_layout(args).world_size > 1:
        return ParallelMode.DISTRIBUTED
    if family == "jax" and "jax" in sys.modules:
        import jax

        if jax.local_device_count() > 1:
            return ParallelMode.NOT_DISTRIBUTED
    return ParallelMode.NOT_PARALLEL


def barrier(args: Any, desc: str = "work") -> None:
    """Waits until every process of the run reaches this point (no-op for one process)."""
    layout = process_layout(args)
    if layout.world_size <= 1:
        return
    family = backend_family(args)
    if family == "jax":
        from jax.experimental import multihost_utils

        from .backends.jax.multihost import initialize_from_env

        initialize_from_env(args)
        multihost_utils.sync_global_devices(f"xtrainer:{desc}")
    elif family == "torch_xla":
        import torch_xla.core.xla_model as xm

        xm.rendezvous(desc)
    else:
        import torch.distributed as dist

        from .backends.torch.distributed import init_from_env

        init_from_env(args)  # scripts call this before any Trainer joins the process group
        dist.barrier()


@contextlib.contextmanager
def main_process_first(args: Any, local: bool = True, desc: str = "work"):
    """Runs the block on the main process (of each node with local=True) first, the others after it, as
    transformers' `TrainingArguments.main_process_first` does (e.g. dataset.map caching its result once)."""
    layout = process_layout(args)
    if layout.world_size <= 1:
        yield
        return
    is_main = (layout.local_process_index if local else layout.process_index) == 0
    try:
        if not is_main:
            logger.debug("process %d waits for the main process to do %s", layout.process_index, desc)
            barrier(args, desc)
        yield
    finally:
        if is_main:
            barrier(args, desc)
