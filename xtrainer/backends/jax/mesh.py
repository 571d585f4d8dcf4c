"""jax.sharding objects from the backend-neutral MeshConfig and sharding rules (xtrainer/sharding.py)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ...sharding import BATCH_AXES, MESH_AXES, MeshConfig, param_spec


def build_mesh(config: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) Mesh over the devices, with Auto axis types where jax has them.

    Auto axes give GSPMD-style sharding propagation on every supported jax version (jax 0.10
    defaults `make_mesh` to Explicit axes; 0.7 has Auto as its only behaviour).
    """
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) != int(np.prod(config.shape)):
        raise ValueError(f"mesh {config.shape} needs {int(np.prod(config.shape))} devices, {len(devices)} are present.")
    grid = np.asarray(devices, dtype=object).reshape(config.shape)
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:
        try:
            return Mesh(grid, MESH_AXES, axis_types=(axis_type.Auto,) * len(MESH_AXES))
        except TypeError:  # a jax whose Mesh takes no axis_types
            pass
    return Mesh(grid, MESH_AXES)


def to_partition_spec(spec: tuple) -> PartitionSpec:
    return PartitionSpec(*spec)


def named(mesh: Mesh, spec: tuple = ()) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(*spec))


def batch_spec(leading: int = 0) -> tuple:
    """Batch arrays shard their batch dim over data and fsdp; `leading` dims (accumulation) stay whole."""
    return (None,) * leading + (BATCH_AXES,)


def param_shardings(mesh: Mesh, config: MeshConfig, flat_params: dict, logical: dict, rules) -> dict:
    """path -> NamedSharding for each parameter (rule, then logical annotation, then FSDP default)."""
    out = {}
    for path, value in flat_params.items():
        spec = param_spec(path, np.shape(value), config, rules, logical.get(path))
        out[path] = NamedSharding(mesh, PartitionSpec(*spec))
    return out
