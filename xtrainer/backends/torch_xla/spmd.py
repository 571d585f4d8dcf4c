"""torch_xla SPMD plumbing: the mesh, sharded placement of parameters and inputs, host transfers.

The mesh and the partition specs come from the backend-neutral xtrainer/sharding.py, exactly as
for the JAX backend: a (data, fsdp, tensor) mesh, parameters sharded by the user's regex rules or
else the default FSDP rule, inputs sharded on their batch dim over (data, fsdp).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping

import numpy as np
import torch
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.debug.metrics as met
import torch_xla.runtime as xr
from torch import nn

from ...sharding import BATCH_AXES, MESH_AXES, MeshConfig, param_spec

logger = logging.getLogger(__name__)


def ensure_spmd() -> None:
    """Switches the XLA runtime to SPMD mode (idempotent).

    Must happen before any tensor reaches an XLA device; tensors already placed in non-SPMD mode
    get replicated by torch_xla, which is slow and warned about.
    """
    import os

    if os.environ.get("XLA_USE_SPMD") == "1" or getattr(xr, "is_spmd", lambda: False)():
        return
    if torch_xla._XLAC._xla_get_spmd_config_is_locked():
        warnings.warn(
            "backend='torch_xla' switches torch_xla to SPMD mode, but tensors were already placed on an XLA device "
            "before the Trainer was built; they are replicated now. Build the Trainer before moving anything to "
            "the XLA device (or call torch_xla.runtime.use_spmd() first).",
            RuntimeWarning,
            stacklevel=3,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # use_spmd's own message about the replication (warned above)
        xr.use_spmd()


def build_mesh(config: MeshConfig):
    """An `xs.Mesh` with axes (data, fsdp, tensor) of the sizes in `config`, over all devices."""
    import torch_xla.distributed.spmd as xs

    num_devices = xr.global_runtime_device_count()
    if num_devices != int(np.prod(config.shape)):
        raise ValueError(f"mesh {config.shape} needs {int(np.prod(config.shape))} devices, {num_devices} are present.")
    return xs.Mesh(np.arange(num_devices), config.shape, MESH_AXES)


class Placement:
    """Sharded placement on one mesh: partition specs -> `xs.ShardingSpec`, cached per spec."""

    def __init__(self, mesh, config: MeshConfig, rules=(), min_size: int = 0):
        self.mesh, self.config, self.rules = mesh, config, list(rules)
        self.min_size = min_size  # fsdp_config's min_num_params: smaller parameters stay replicated
        self.device = torch_xla.device()
        self._specs: dict[tuple, object] = {}

    def sharding(self, spec: tuple):
        import torch_xla.distributed.spmd as xs

        spec = tuple(spec)
        found = self._specs.get(spec)
        if found is None:
            found = self._specs[spec] = xs.ShardingSpec(self.mesh, spec)
        return found

    def param_spec(self, name: str, shape) -> tuple:
        return param_spec(name, tuple(shape), self.config, self.rules, min_size=self.min_size)

    def put(self, tensors: list[torch.Tensor], specs: list[tuple]) -> list[torch.Tensor]:
        """CPU tensors -> XLA tensors sharded by their specs (0-d tensors replicated).

        Each tensor is sent already split into its shards where torch_xla can do that (no device
        ever holds the whole tensor); torch_xla 2.9's ShardingSpec rejects some specs (any 1-d
        sharding, some multi-axis tilings), and those tensors are annotated on the device instead.
        """
        out: list[torch.Tensor | None] = [None] * len(tensors)
        by_spec: dict[tuple, list[int]] = {}
        for i, (tensor, spec) in enumerate(zip(tensors, specs)):
            spec = tuple(spec) if tensor.dim() else ()
            if tensor.dim() == 1 and spec[0] is not None:
                out[i] = self._put_and_mark(tensors[i], spec)
                continue
            by_spec.setdefault(spec, []).append(i)
        for spec, indices in by_spec.items():
            cpu = [tensors[i].detach().cpu().contiguous() for i in indices]
            try:
                if spec:
                    moved = xm.send_cpu_data_to_device(cpu, self.device, input_sharding=self.sharding(spec))
                else:
                    moved = xm.send_cpu_data_to_device(cpu, self.device)
            except (IndexError, RuntimeError):
                moved = [self._put_and_mark(t, spec) for t in cpu]
            for i, tensor in zip(indices, moved):
                out[i] = tensor
        return out  # type: ignore[return-value]

    def _put_and_mark(self, tensor: torch.Tensor, spec: tuple) -> torch.Tensor:
        import torch_xla.distributed.spmd as xs

        moved = tensor.detach().cpu().contiguous().to(self.device)
        xs.mark_sharding(moved, self.mesh, spec)
        return moved

    def batch_spec(self, value: torch.Tensor) -> tuple:
        """(data, fsdp) on the batch dim when it splits evenly over them, else replicated."""
        spec = [None] * value.dim()
        if value.dim() and self.config.batch_devices > 1 and value.shape[0] % self.config.batch_devices == 0:
            spec[0] = BATCH_AXES
        return tuple(spec)

    def put_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        keys = list(batch)
        tensors = [torch.from_numpy(np.ascontiguousarray(batch[k])) for k in keys]
        moved = self.put(tensors, [self.batch_spec(t) for t in tensors])
        return dict(zip(keys, moved))


def _tied_groups(model: nn.Module) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return groups


def place_model(model: nn.Module, placement: Placement) -> tuple[nn.Module, dict[str, tuple]]:
    """A copy of `model` on the XLA device with every parameter sharded by its spec.

    Returns the device model and {parameter name: spec}. Tied parameters (one Parameter under
    several names) stay one Parameter: `nn.Module.to(xla)` would untie them, since an XLA tensor
    cannot share the CPU one's storage. Buffers are replicated.
    """
    device_model = copy.deepcopy(model)
    named = list(device_model.named_parameters())  # first name of each distinct parameter
    specs = {name: placement.param_spec(name, p.shape) for name, p in named}
    moved = placement.put([p for _, p in named], [specs[n] for n, _ in named])
    new_params = {id(p): nn.Parameter(t, requires_grad=p.requires_grad) for (_, p), t in zip(named, moved)}
    buffers = {}
    for module in device_model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[key] = new_params[id(param)]
        for key, buf in list(module._buffers.items()):
            if buf is not None:
                if id(buf) not in buffers:
                    buffers[id(buf)] = buf.to(placement.device)
                module._buffers[key] = buffers[id(buf)]
    return device_model, specs


def sharding_of(tensor: torch.Tensor) -> str:
    """torch_xla's sharding annotation of a tensor ('{replicated}', '{devices=[4,1]0,1,2,3}', ...)."""
    return torch_xla._XLAC._get_xla_sharding_spec(tensor)


def load_into(device_model: nn.Module, state_dict: Mapping[str, torch.Tensor], placement: Placement, specs: dict) -> None:
    """Copies host tensors into the device model in place (parameter objects are kept: the
    optimizer holds them), each re-sent with its sharding."""
    params = dict(device_model.named_parameters())
    names = [n for n in params if n in state_dict]
    moved = placement.put([state_dict[n] for n in names], [specs.get(n, (None,) * params[n].dim()) for n in names])
    with torch.no_grad():
        for name, tensor in zip(names, moved):
            params[name].data = tensor
        for name, buf in device_model.named_buffers():
            if name in state_dict:
                buf.copy_(state_dict[name].to(buf.dtype))


def shard_optimizer_state(optimizer: torch.optim.Optimizer, placement: Placement, specs_by_param: dict[int, tuple]) -> None:
    """Gives each not yet annotated optimizer state tensor shaped like its parameter the parameter's sharding.

    Called right after the optimizer step that created the state (the annotation then constrains
    the traced step, instead of leaving the moments' layout to XLA's sharding propagation), and
    after loading an optimizer.pt, whose tensors arrive unannotated. Either way the moments end up
    laid out like their parameters, and a resumed run traces the same graph as an uninterrupted one.
    """
    import torch_xla.distributed.spmd as xs

    for param, state in optimizer.state.items():
        spec = specs_by_param.get(id(param))
        if spec is None:
            continue
        for value in state.values():
            if (
                isinstance(value, torch.Tensor)
                and value.device.type == "xla"
                and value.dim()
                and tuple(value.shape) == tuple(param.shape)
                and sharding_of(value) == ""
            ):
                xs.mark_sharding(value, placement.mesh, tuple(spec))


def to_cpu(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """XLA tensors -> CPU tensors with one synchronisation for all of them.

    Sharded tensors are assembled on the host from their device shards: asking XLA for the whole
    tensor would compile a gather program per shape and sharding.
    """
    tensors = list(tensors)
    if not tensors:
        return []
    torch_xla._XLAC._xla_sync_multi(tensors, devices=[], wait=True, sync_xla_data=False)
    sharded = [i for i, t in enumerate(tensors) if sharding_of(t) not in ("", "{replicated}")]
    whole = [i for i in range(len(tensors)) if i not in set(sharded)]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for i, cpu in zip(whole, torch_xla._XLAC._xla_get_cpu_tensors([tensors[i] for i in whole])):
        out[i] = cpu
    if sharded:
        group = [tensors[i] for i in sharded]
        shards = torch_xla._XLAC._get_local_shards(group)
        places = torch_xla._XLAC._get_local_shard_replica_and_indices(group)
        for i, tensor, pieces, where in zip(sharded, group, shards, places):
            out[i] = _assemble(tensor, pieces, where)
    return out  # type: ignore[return-value]


def _assemble(tensor: torch.Tensor, pieces, where) -> torch.Tensor:
    full = torch.empty(tuple(tensor.shape), dtype=tensor.dtype)
    for (data, _device), (_replica, indices) in zip(pieces, where):
        if indices is Ellipsis or indices == Ellipsis:
            return data.clone()
        own = tuple(slice(0, s.stop - s.start) for s in indices)  # shards may carry padding
        full[tuple(indices)] = data[own]
    return full


def compile_count() -> int:
    """How many XLA graphs this process has compiled so far (torch_xla's CompileTime metric)."""
    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def host_read_count() -> int:
    """How many device -> host transfers this process has made (TransferFromDeviceTime samples)."""
    data = met.metric_data("TransferFromDeviceTime")
    return int(data[0]) if data else 0


def sync() -> None:
    """Cuts the pending lazy graph and dispatches it (asynchronously)."""
    sync_fn = getattr(torch_xla, "sync", None)
    if sync_fn is not None:
        sync_fn()
    else:  # torch_xla < 2.6
        xm.mark_step()
