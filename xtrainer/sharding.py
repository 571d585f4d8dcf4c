"""Mesh configuration and parameter sharding rules, independent of any device library.

Shardings are described as tuples with one entry per tensor dim: a mesh axis name, a tuple of
axis names, or None (replicated). Backends turn them into `jax.sharding.PartitionSpec` or torch_xla
partition specs. Precedence for a parameter: a user `sharding_rules` regex that matches its path,
then its Flax logical-axis annotation, then the default FSDP rule.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Spec = tuple  # one entry per dim: None | axis name | tuple of axis names

# Logical axis names used by the reference models -> mesh axes. Embedding-sized dims shard over
# fsdp (ZeRO-3 style); the wide dims of attention/MLP shard over tensor (Megatron style).
DEFAULT_LOGICAL_RULES: dict[str, str | tuple | None] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "q_heads": "tensor",
    "kv": None,
    "head_dim": None,
    "norm": None,
    "length": None,
    "layers": None,
    "classes": None,
}


@dataclass(frozen=True)
class MeshConfig:
    """Axis sizes of a data/fsdp/tensor device mesh; their product is the device count."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @property
    def batch_devices(self) -> int:
        """Devices the global batch is split over (the tensor axis does not split the batch)."""
        return self.data * self.fsdp

    @classmethod
    def resolve(cls, spec: Mapping[str, int] | str | None, num_devices: int) -> MeshConfig:
        """Turns args.mesh (sizes, -1 meaning "the rest") into concrete sizes for num_devices.

        With no spec every device goes to the data axis.

        Raises:
            ValueError: unknown axis names, several -1, or sizes that do not multiply to num_devices.
        """
        if isinstance(spec, str):
            spec = json.loads(spec)
        spec = dict(spec or {"data": -1})
        unknown = sorted(set(spec) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"mesh has unknown axes {unknown}; the axes are {list(MESH_AXES)}.")
        sizes = {axis: int(spec.get(axis, 1)) for axis in MESH_AXES}
        free = [axis for axis, size in sizes.items() if size == -1]
        if len(free) > 1:
            raise ValueError(f"mesh may use -1 for one axis only, got -1 for {free}.")
        bad = [axis for axis, size in sizes.items() if size == 0 or size < -1]
        if bad:
            raise ValueError(f"mesh axis sizes must be positive (or -1), got {spec}.")
        fixed = 1
        for axis, size in sizes.items():
            if size != -1:
                fixed *= size
        if free:
            if num_devices % fixed:
                raise ValueError(
                    f"mesh {spec} cannot fill {num_devices} devices: the fixed axes use {fixed}, which does not divide "
                    f"{num_devices}."
                )
            sizes[free[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(
                f"mesh {spec} needs {fixed} devices but {num_devices} are present; make the axis sizes multiply to "
                f"{num_devices}, or use -1 for one axis."
            )
        return cls(**sizes)


def parse_sharding_rules(rules: Sequence | str | None) -> list[tuple[re.Pattern, Spec]]:
    """args.sharding_rules ([[regex, [axis|null|[axes], ...]], ...] or its JSON) -> compiled rules."""
    if rules is None:
        return []
    if isinstance(rules, str):
        rules = json.loads(rules)
    compiled = []
    for entry in rules:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"Each sharding rule must be [regex, partition spec], got {entry!r}.")
        pattern, spec = entry
        spec = tuple(tuple(s) if isinstance(s, list) else s for s in spec)
        for axis in _axes_of(spec):
            if axis not in MESH_AXES:
                raise ValueError(f"Sharding rule {pattern!r} names unknown mesh axis {axis!r}; axes: {list(MESH_AXES)}.")
        compiled.append((re.compile(pattern), spec))
    return compiled


def _axes_of(spec: Spec) -> list[str]:
    out = []
    for entry in spec:
        if entry is None:
            continue
        out.extend(entry if isinstance(entry, tuple) else (entry,))
    return out


def _axis_size(entry, mesh: MeshConfig) -> int:
    size = 1
    for axis in (entry if isinstance(entry, tuple) else (entry,)):
        size *= getattr(mesh, axis)
    return size


def fit_spec(spec: Spec, shape: Sequence[int], mesh: MeshConfig) -> Spec:
    """Drops (replicates) spec entries whose mesh size does not divide the dim, and size-1 axes."""
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    fitted = []
    for entry, dim in zip(spec[: len(shape)], shape):
        if entry is None or _axis_size(entry, mesh) == 1 or dim % _axis_size(entry, mesh):
            fitted.append(None)
        else:
            fitted.append(entry)
    return tuple(fitted)


def fsdp_spec(shape: Sequence[int], mesh: MeshConfig) -> Spec:
    """The default rule: shard the largest dim that the fsdp axis divides evenly; else replicate."""
    spec: list = [None] * len(shape)
    if mesh.fsdp > 1:
        for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
            if shape[dim] % mesh.fsdp == 0:
                spec[dim] = "fsdp"
                break
    return tuple(spec)


def logical_to_spec(names: Sequence[str | None], rules: Mapping[str, object] = DEFAULT_LOGICAL_RULES) -> Spec:
    """Flax logical axis names -> mesh-axis spec (an axis is used at most once per tensor)."""
    used: set[str] = set()
    spec = []
    for name in names:
        target = rules.get(name) if name is not None else None
        axes = tuple(a for a in (target if isinstance(target, tuple) else (target,)) if a is not None and a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return tuple(spec)


def param_spec(
    path: str,
    shape: Sequence[int],
    mesh: MeshConfig,
    rules: list[tuple[re.Pattern, Spec]] = (),
    logical_names: Sequence[str | None] | None = None,
    min_size: int = 0,
) -> Spec:
    """The sharding of one parameter (see the module docstring for precedence).

    `min_size` (fsdp_config's min_num_params): a parameter with fewer elements that no user rule
    matches stays replicated, since splitting it saves less memory than its gathers cost.
    """
    for pattern, spec in rules:
        if pattern.search(path):
            return fit_spec(spec, shape, mesh)
    if min_size and math.prod(shape) < min_size:
        return (None,) * len(shape)
    if logical_names is not None:
        return fit_spec(logical_to_spec(logical_names), shape, mesh)
    return fsdp_spec(shape, mesh)
