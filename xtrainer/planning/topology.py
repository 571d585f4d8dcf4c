"""A TPU preset as the devices of a TPU topology that is not here, for ahead-of-time compiles.

libtpu (the TPU compiler, `pip install 'xtrainer[plan]'`) describes any Cloud TPU topology without the
hardware: `jax.experimental.topologies.get_topology_desc` returns its devices, and a step lowered with
shardings over them compiles for that TPU on this machine (MaxText's train_compile.py does the same).
The JAX runtime itself stays on whatever platform this process uses (CPU on a laptop).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

from ..tpu_presets import TpuPreset

INSTALL_HINT = "xtrainer plan needs libtpu, the TPU compiler: pip install 'xtrainer[plan]'"

# jax's topology names per generation (v5p may also be spelled "v5").
_TOPOLOGY_PREFIX = {"v4": "v4", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}
# Chips of one TPU VM laid out on the topology grid (what libtpu calls the host bounds).
_HOST_BOUNDS = {1: (1, 1, 1), 2: (1, 2, 1), 4: (2, 2, 1), 8: (2, 4, 1)}


class PlanDependencyError(ImportError):
    """libtpu is missing or does not match the installed jax."""


def require_libtpu() -> None:
    """Raises PlanDependencyError (one line: what to install) when libtpu is not installed."""
    if importlib.util.find_spec("libtpu") is None:
        raise PlanDependencyError(INSTALL_HINT)


@contextlib.contextmanager
def _quiet_libtpu(accelerator_type: str):
    """Environment that keeps libtpu from looking for TPU VM metadata while it starts.

    libtpu reads these once, when the TPU compiler first loads in this process; they are put back
    afterwards, since xtrainer's backend="auto" reads TPU_ACCELERATOR_TYPE to detect a TPU host.
    """
    # ALLOW_MULTIPLE_LIBTPU_LOAD: without it, a second process that loads libtpu (another plan, a test
    # run in parallel) fails on libtpu's /tmp lockfile; compiling needs no exclusive TPU access.
    wanted = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": accelerator_type,
              "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    before = {name: os.environ.get(name) for name in wanted}
    for name, value in wanted.items():
        os.environ.setdefault(name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def topology_name(preset: TpuPreset) -> str:
    """'v5p:4x4x4' for the v5p-128 preset: jax's name of one slice of the preset."""
    prefix = _TOPOLOGY_PREFIX.get(preset.generation)
    if prefix is None:
        raise ValueError(f"Preset {preset.name!r}: planning knows TPU generations {sorted(_TOPOLOGY_PREFIX)}, "
                         f"not {preset.generation!r}.")
    return f"{prefix}:{preset.topology}"


@functools.lru_cache(maxsize=None)
def _devices(name: str, chip_config: str, host_bounds: tuple, num_slices: int, accelerator_type: str) -> tuple:
    require_libtpu()
    from jax.experimental import topologies

    with _quiet_libtpu(accelerator_type):
        try:
            desc = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name=chip_config,
                                                chips_per_host_bounds=host_bounds, num_slices=num_slices)
        except RuntimeError as exc:  # jax's JaxRuntimeError
            raise PlanDependencyError(f"libtpu could not describe TPU topology {name!r}: {exc}. {INSTALL_HINT} "
                                      "(a libtpu matching the installed jax).") from exc
    return tuple(desc.devices)


def topology_devices(preset: TpuPreset) -> list:
    """The JAX devices of the preset's topology (all slices), in jax's order.

    Raises:
        PlanDependencyError: libtpu is not installed, or cannot describe this topology.
        ValueError: the preset's devices or hosts disagree with the topology libtpu describes.
    """
    per_host = preset.devices_per_host // preset.devices_per_chip
    if per_host not in _HOST_BOUNDS:
        raise ValueError(f"Preset {preset.name!r}: {per_host} chips per host is not a TPU VM shape planning knows.")
    # v4 and v5p chips hold two TensorCores that JAX drives as one "megacore" device.
    chip_config = "megacore" if preset.tensorcores_per_chip == 2 and preset.devices_per_chip == 1 else "default"
    devices = list(_devices(topology_name(preset), chip_config, _HOST_BOUNDS[per_host], preset.num_slices,
                            preset.accelerator_type))
    hosts = len({d.process_index for d in devices})
    if len(devices) != preset.devices or hosts != preset.hosts:
        raise ValueError(f"Preset {preset.name!r} says {preset.devices} devices on {preset.hosts} hosts, but libtpu's "
                         f"{topology_name(preset)} has {len(devices)} devices on {hosts} hosts.")
    return devices
