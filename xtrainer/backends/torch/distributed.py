"""torch.distributed plumbing for the torch backend: process group, DDP / FSDP2 wrapping, no_sync.

Processes are started by torchrun (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK).

Data parallelism follows transformers' Trainer: every process runs its slice of the global batch
(see data.BatchPlan) and gradients are averaged across processes, so N processes with batch b train
exactly like one process with batch N*b.

- DDP: the module that runs forward is a `DistributedDataParallel` wrapper; the user's model object
  keeps holding plain, full, replicated parameters.
- FSDP2 (`fsdp=True`, `"full_shard"`, `"shard_grad_op"`, ... with `fsdp_config`; see fsdp.py):
  `fully_shard` is applied *in place* to the wrapped units (by default each transformer block) and
  to the root, as accelerate does for transformers' Trainer, so the user's model object holds
  DTensor shards afterwards. Full weights are gathered when they are saved
  (`Trainer.save_model` / checkpoints write an ordinary model.safetensors on rank 0), or with
  `torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ...fsdp_options import FsdpOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: world size, ranks, and whether parameters are sharded."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    fsdp: bool = False
    save_on_each_node: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def writes_checkpoints(self) -> bool:
        """Whether this process writes the replicated checkpoint files and owns the checkpoint directory: rank 0,
        or with save_on_each_node the first process of every node (each node then holds a whole checkpoint in
        its own output_dir, as transformers writes it)."""
        return self.local_rank == 0 if self.save_on_each_node else self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether parameters and optimizer state are split across processes (FSDP on >1 process)."""
        return self.fsdp and self.world_size > 1


def _wants_fsdp(args) -> bool:
    options = FsdpOptions.from_args(args)
    return options.enabled and options.shard  # fsdp="no_shard" is plain data parallelism (DDP)


def init_from_env(args) -> DistInfo:
    """Joins the process group the launcher describes in the environment (no-op for one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        if _wants_fsdp(args):
            logger.warning("fsdp is set, but this run has one process: the model is not sharded. Launch several "
                           "processes (torchrun --nproc_per_node=N) to shard it with FSDP2.")
        return DistInfo()
    use_cuda = torch.cuda.is_available() and not getattr(args, "use_cpu", False)
    if not dist.is_initialized():
        backend = getattr(args, "ddp_backend", None) or ("nccl" if use_cuda else "gloo")
        timeout = datetime.timedelta(seconds=getattr(args, "ddp_timeout", None) or 1800)
        dist.init_process_group(backend=backend, timeout=timeout)
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    info = DistInfo(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        fsdp=_wants_fsdp(args),
        save_on_each_node=bool(getattr(args, "save_on_each_node", False)),
    )
    several_nodes = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) < info.world_size
    if info.sharded and info.save_on_each_node and several_nodes:
        # The same condition on every rank, so every rank refuses alike (none waits in a collective).
        raise ValueError(
            "save_on_each_node=True cannot be combined with FSDP on several nodes: the full model is gathered on "
            "rank 0 only. Put output_dir on storage every node shares and leave save_on_each_node off."
        )
    return info


def unwrap(module: nn.Module) -> nn.Module:
    """The module under torch.compile and DDP wrappers (an FSDP2 module is its own model)."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):  # torch.compile
            module = module._orig_mod
        else:
            return module


def _is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 keeps FSDP2 under _composable
        from torch.distributed._composable.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def _fully_shard(model: nn.Module, args, info: DistInfo, device: torch.device) -> nn.Module:
    from . import fsdp

    return fsdp.shard(model, args, info.world_size, info.rank, device)  # fsdp_config's keys: see fsdp.py


def _find_unused_parameters(model: nn.Module, args) -> bool:
    """transformers' default: search for unused parameters unless gradient checkpointing is on."""
    explicit = getattr(args, "ddp_find_unused_parameters", None)
    if explicit is not None:
        return bool(explicit)
    if hasattr(model, "is_gradient_checkpointing"):
        return not model.is_gradient_checkpointing
    return True


def wrap_model(model: nn.Module, args, info: DistInfo, device: torch.device) -> nn.Module:
    """Returns the module that runs forward: the model, a DDP wrapper, or the model sharded by FSDP2.

    FSDP2 shards `model` in place (see the module docstring); DDP leaves it untouched.
    """
    if info.world_size <= 1:
        return model
    if info.fsdp:
        return _fully_shard(model, args, info, device)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs(model, args))


def ddp_kwargs(model: nn.Module, args) -> dict:
    """DistributedDataParallel options from the arguments (transformers' ddp_* fields; unset ones keep torch's)."""
    kwargs = {"find_unused_parameters": _find_unused_parameters(model, args)}
    for option, field in (("bucket_cap_mb", "ddp_bucket_cap_mb"), ("broadcast_buffers", "ddp_broadcast_buffers"),
                          ("static_graph", "ddp_static_graph")):
        value = getattr(args, field, None)
        if value is not None:
            kwargs[option] = value
    return kwargs


def no_sync(model: nn.Module):
    """Skips the gradient all-reduce for a micro-batch that is not the last of its window."""
    model = model._orig_mod if isinstance(getattr(model, "_orig_mod", None), nn.Module) else model
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if _is_fsdp(model):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    # Gradients accumulate unsharded until the window's last backward reduce-scatters them.
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clips in place and returns the pre-clip global gradient norm (a device scalar).

    Gradients are already averaged across processes (DDP) or sharded DTensors whose norm is
    reduced over the mesh (FSDP2), so every process gets the same norm.
    """
    norm = nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return norm


def barrier(info: DistInfo) -> None:
    """Waits for every process (no-op on one process)."""
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()


def all_sum(value: int, info: DistInfo, device: torch.device) -> int:
    """Sums an integer over all processes (HF's token count across devices)."""
    if info.world_size <= 1:
        return value
    tensor = torch.tensor(value, dtype=torch.int64, device=device)
    dist.all_reduce(tensor)
    return int(tensor.item())


def mean_over_processes(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The element-wise mean of a tensor over all processes (the loss transformers logs).

    gloo has no AVG reduction, hence a sum and a division. Under NCCL the all-reduce is only
    enqueued on the stream, so the host still does not wait for the step.
    """
    if info.world_size <= 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / info.world_size


def broadcast_object(obj, info: DistInfo):
    """Rank 0's `obj` on every process (e.g. an error found while reading a file on rank 0 only)."""
    if info.world_size <= 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
