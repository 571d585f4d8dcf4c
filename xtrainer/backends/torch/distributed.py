"""torch.distributed plumbing for the torch backend: process group, DDP / FSDP2 wrapping, no_sync.

Processes are started by torchrun (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _wants_fsdp(args) -> bool:
    fsdp = getattr(args, "fsdp", None) or ""
    if isinstance(fsdp, (list, tuple)):
        fsdp = " ".join(str(getattr(f, "value", f)) for f in fsdp)
    return "full_shard" in str(fsdp) or "shard_grad_op" in str(fsdp)


def init_from_env(args) -> DistInfo:
    """Joins the process group the launcher describes in the environment (no-op for one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and not getattr(args, "use_cpu", False)
        backend = getattr(args, "ddp_backend", None) or ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend=backend)
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        fsdp=_wants_fsdp(args),
    )


def _fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: `_no_split_modules` classes of HF models, else none."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


def wrap_model(model: nn.Module, args, info: DistInfo, device: torch.device) -> nn.Module:
    """Returns the module that runs forward: the model, a DDP wrapper, or the model sharded by FSDP2."""
    if info.world_size <= 1:
        return model
    if info.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in _fsdp_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def no_sync(model: nn.Module):
    """Skips the gradient all-reduce for a micro-batch that is not the last of its window."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clips in place and returns the pre-clip global gradient norm (a device scalar)."""
    norm = nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return norm


def barrier(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()


def all_sum(value: int, info: DistInfo, device: torch.device) -> int:
    """Sums an integer over all processes (HF's token count across devices)."""
    if info.world_size <= 1:
        return value
    tensor = torch.tensor(value, dtype=torch.int64, device=device)
    dist.all_reduce(tensor)
    return int(tensor.item())
