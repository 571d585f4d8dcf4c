"""TPU presets: one YAML file per Cloud TPU topology (tpu_configs/<name>.yaml), loaded and validated.

A preset records what a slice looks like to JAX (chips, devices, hosts), the default device mesh for
it, and the environment (LIBTPU_INIT_ARGS, ...) commonly used on that generation. It is selected
with `TrainingArguments(tpu_config="v5p-128")`; the JAX backend checks it against the devices it
finds and uses its mesh when `mesh` is not given. The schema is documented in tpu_configs/README.md.

Where presets are looked for, first match wins:
  1. the directories in $XTRAINER_TPU_CONFIGS (os.pathsep-separated),
  2. <repo>/tpu_configs (a source checkout, or an editable install),
  3. <sys.prefix>/share/xtrainer/tpu_configs (where a wheel installs the YAML files).
`tpu_config` may also be the path of a YAML file (it must end in .yaml/.yml).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sharding import MESH_AXES, MeshConfig

ENV_DIRS = "XTRAINER_TPU_CONFIGS"
SCHEMA_VERSION = 1

# How the number after the dash in an accelerator type counts: TensorCores (v2-v4, v5p) or chips (v5e, v6e).
SUFFIX_COUNTS = {"v2": "tensorcores", "v3": "tensorcores", "v4": "tensorcores", "v5p": "tensorcores",
                 "v5e": "chips", "v6e": "chips"}

_REQUIRED = ("name", "accelerator_type", "generation", "topology", "chips", "devices_per_chip", "devices",
             "hosts", "devices_per_host", "mesh")
_OPTIONAL = ("schema_version", "description", "tensorcores_per_chip", "num_slices", "vm_type", "hbm_gib_per_chip",
             "env", "batch", "notes", "sources", "chip")
_BATCH_KEYS = ("per_device_train_batch_size", "per_device_eval_batch_size")
# Per-chip figures for the roofline of `xtrainer plan` (xtrainer/planning/roofline.py); each is
# {value: number, source: where it was published}. ICI is the bidirectional bandwidth of one chip.
CHIP_FIGURES = ("peak_bf16_tflops", "hbm_gbytes_per_s", "ici_gbytes_per_s")


class TpuPresetError(ValueError):
    """A preset that is unknown, malformed, inconsistent, or does not match the devices present."""


@dataclass(frozen=True)
class TpuPreset:
    """One validated preset (see tpu_configs/README.md for the meaning of each field).

    Counts are totals over the whole job (all slices): `devices` is what `jax.device_count()` returns,
    `hosts` what `jax.process_count()` returns (one process per TPU VM worker).
    """

    name: str
    accelerator_type: str
    generation: str
    topology: str
    chips: int
    devices_per_chip: int
    devices: int
    hosts: int
    devices_per_host: int
    ici_mesh: dict[str, int]
    dcn_mesh: dict[str, int]
    num_slices: int = 1
    tensorcores_per_chip: int = 1
    vm_type: str | None = None
    hbm_gib_per_chip: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    batch: dict[str, int] = field(default_factory=dict)
    description: str = ""
    notes: str = ""
    sources: tuple[str, ...] = ()
    chip: dict[str, tuple[float, str]] = field(default_factory=dict)  # figure -> (value, source); see CHIP_FIGURES
    path: str | None = None

    def mesh_dict(self) -> dict[str, int]:
        """The default mesh as TrainingArguments.mesh takes it: ICI size x DCN size per axis."""
        return {axis: self.ici_mesh[axis] * self.dcn_mesh[axis] for axis in MESH_AXES}

    def mesh_config(self) -> MeshConfig:
        """The default mesh as a MeshConfig (its product is `devices`)."""
        return MeshConfig(**self.mesh_dict())

    def summary(self) -> str:
        mesh = " ".join(f"{axis}={size}" for axis, size in self.mesh_dict().items())
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        return (
            f"{self.accelerator_type}{slices} ({self.topology}): {_plural(self.chips, 'chip')}, "
            f"{_plural(self.devices, 'device')}, {_plural(self.hosts, 'host')}; mesh {mesh}"
        )

    def env_exports(self) -> str:
        """`export NAME='value'` lines for the recommended environment (for a shell before launching)."""
        return "\n".join(f"export {name}='{value}'" for name, value in self.env.items())

    def apply_env(self, *, override: bool = False) -> dict[str, str]:
        """Sets the recommended environment variables in os.environ (not the ones already set, unless override).

        Must run before JAX / torch_xla start the TPU runtime (libtpu reads LIBTPU_INIT_ARGS once).
        Returns the variables it set.
        """
        applied = {}
        for name, value in self.env.items():
            if override or name not in os.environ:
                os.environ[name] = value
                applied[name] = value
        return applied


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 'es' if noun.endswith('s') else 's'}"


# ---------------------------------------------------------------------------------------------- lookup


def search_dirs() -> list[Path]:
    """The directories searched for presets, in order (see the module docstring)."""
    dirs = [Path(p).expanduser() for p in os.environ.get(ENV_DIRS, "").split(os.pathsep) if p.strip()]
    dirs.append(Path(__file__).resolve().parent.parent / "tpu_configs")
    dirs.append(Path(sys.prefix) / "share" / "xtrainer" / "tpu_configs")
    seen, out = set(), []
    for d in dirs:
        key = str(d.resolve()) if d.exists() else str(d)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _preset_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in search_dirs():
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.suffix in (".yaml", ".yml") and path.is_file():
                found.setdefault(path.stem, path)
    return found


def list_presets() -> list[str]:
    """Names of the presets found (sorted by generation, then size)."""
    return sorted(_preset_files(), key=_sort_key)


def _sort_key(name: str):
    gen, _, size = name.partition("-")
    return (gen, int(size) if size.isdigit() else math.inf, name)


def load_preset(name_or_path: str | os.PathLike) -> TpuPreset:
    """Loads and validates a preset by name (e.g. "v5p-128") or from a YAML file path.

    Raises:
        TpuPresetError (a ValueError): unknown name (the message lists the valid names), unreadable or
            malformed YAML, or a preset whose numbers do not add up.
    """
    text = os.fspath(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise TpuPresetError(f"tpu_config={text!r}: no such preset file.")
        return preset_from_dict(_read_yaml(path), path=path, expect_name=None)
    files = _preset_files()
    if text not in files:
        valid = ", ".join(list_presets()) or "none found"
        raise TpuPresetError(
            f"Unknown tpu_config={text!r}. Valid presets: {valid}. (Searched: "
            f"{', '.join(str(d) for d in search_dirs())}; add directories with ${ENV_DIRS}, or pass a .yaml path.)"
        )
    return preset_from_dict(_read_yaml(files[text]), path=files[text], expect_name=text)


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TpuPresetError(f"TPU preset {path} could not be read: {exc}") from exc
    if not isinstance(data, dict):
        raise TpuPresetError(f"TPU preset {path} must be a YAML mapping, got {type(data).__name__}.")
    return data


# ---------------------------------------------------------------------------------------------- validation


def preset_from_dict(data: Mapping[str, Any], *, path: str | os.PathLike | None = None,
                     expect_name: str | None = None) -> TpuPreset:
    """Validates a preset mapping (the parsed YAML) and builds the TpuPreset.

    Raises:
        TpuPresetError: every problem found, one per line.
    """
    where = f"TPU preset {str(path) if path else data.get('name', '?')!r}"
    errors: list[str] = []

    missing = [k for k in _REQUIRED if k not in data]
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if missing:
        errors.append(f"missing keys: {missing}")
    if unknown:
        errors.append(f"unknown keys: {unknown} (allowed: {sorted(_REQUIRED + _OPTIONAL)})")
    if missing:
        raise TpuPresetError(f"{where} is invalid:\n  " + "\n  ".join(errors))

    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        errors.append(f"schema_version is {version!r}; this xtrainer reads version {SCHEMA_VERSION}")

    def pos_int(key, default=None):
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            errors.append(f"{key} must be a positive integer, got {value!r}")
            return 1
        return value

    for key in ("name", "accelerator_type", "generation", "topology"):
        if not isinstance(data[key], str) or not data[key]:
            errors.append(f"{key} must be a non-empty string, got {data[key]!r}")
    name = str(data["name"])
    if expect_name is not None and name != expect_name:
        errors.append(f"name is {name!r} but the file is {expect_name}.yaml; they must match")

    chips, per_chip, devices = pos_int("chips"), pos_int("devices_per_chip"), pos_int("devices")
    hosts, per_host = pos_int("hosts"), pos_int("devices_per_host")
    slices, cores = pos_int("num_slices", 1), pos_int("tensorcores_per_chip", 1)

    if chips * per_chip != devices:
        errors.append(f"chips x devices_per_chip = {chips} x {per_chip} = {chips * per_chip}, but devices = {devices}")
    if hosts * per_host != devices:
        errors.append(f"hosts x devices_per_host = {hosts} x {per_host} = {hosts * per_host}, but devices = {devices}")
    if chips % slices or hosts % slices:
        errors.append(f"chips ({chips}) and hosts ({hosts}) must split evenly over num_slices ({slices})")

    topology = str(data["topology"])
    try:
        topo_chips = math.prod(int(d) for d in topology.lower().split("x"))
    except ValueError:
        errors.append(f"topology must look like 2x2x1 or 4x4, got {topology!r}")
    else:
        if topo_chips * slices != chips:
            errors.append(f"topology {topology} has {topo_chips} chips per slice; x {slices} slices != chips = {chips}")

    generation, accel = str(data["generation"]), str(data["accelerator_type"])
    counts = SUFFIX_COUNTS.get(generation)
    suffix = accel.rpartition("-")[2]
    if counts and suffix.isdigit():
        per_slice = chips // slices * (cores if counts == "tensorcores" else 1)
        if int(suffix) != per_slice:
            errors.append(
                f"accelerator_type {accel}: for {generation} the suffix counts {counts} per slice, so it should be "
                f"{per_slice} (chips per slice {chips // slices}, tensorcores_per_chip {cores})"
            )

    ici, dcn = _mesh_part(data["mesh"], "ici", errors), _mesh_part(data["mesh"], "dcn", errors)
    if isinstance(data["mesh"], Mapping):
        extra = sorted(set(data["mesh"]) - {"ici", "dcn"})
        if extra:
            errors.append(f"mesh has unknown parts {extra}; use mesh.ici and mesh.dcn")
    if math.prod(ici.values()) * math.prod(dcn.values()) != devices:
        errors.append(
            f"mesh ici {ici} x dcn {dcn} covers {math.prod(ici.values()) * math.prod(dcn.values())} devices, "
            f"but devices = {devices}"
        )
    if math.prod(dcn.values()) != slices:
        errors.append(
            f"mesh.dcn spans {math.prod(dcn.values())} slices but num_slices = {slices} (DCN axes run across slices)"
        )

    env = data.get("env") or {}
    if not isinstance(env, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        errors.append(f"env must map variable names to strings, got {env!r}")
        env = {}
    batch = data.get("batch") or {}
    if not isinstance(batch, Mapping) or set(batch) - set(_BATCH_KEYS) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in batch.values()
    ):
        errors.append(f"batch may hold {list(_BATCH_KEYS)} as positive integers, got {batch!r}")
        batch = {}
    sources = data.get("sources") or []
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        errors.append("sources must be a list of strings")
        sources = []
    hbm = data.get("hbm_gib_per_chip")
    if hbm is not None and (isinstance(hbm, bool) or not isinstance(hbm, (int, float)) or hbm <= 0):
        errors.append(f"hbm_gib_per_chip must be a positive number, got {hbm!r}")
    chip = _chip_figures(data.get("chip"), errors)

    if errors:
        raise TpuPresetError(f"{where} is invalid:\n  " + "\n  ".join(errors))
    return TpuPreset(
        name=name,
        accelerator_type=accel,
        generation=generation,
        topology=topology,
        chips=chips,
        devices_per_chip=per_chip,
        devices=devices,
        hosts=hosts,
        devices_per_host=per_host,
        ici_mesh=ici,
        dcn_mesh=dcn,
        num_slices=slices,
        tensorcores_per_chip=cores,
        vm_type=data.get("vm_type"),
        hbm_gib_per_chip=hbm,
        env={k: " ".join(v.split()) for k, v in env.items()},  # folded YAML -> one line
        batch=dict(batch),
        description=str(data.get("description") or ""),
        notes=str(data.get("notes") or "").strip(),
        sources=tuple(sources),
        chip=chip,
        path=str(path) if path is not None else None,
    )


def _chip_figures(chip: Any, errors: list[str]) -> dict[str, tuple[float, str]]:
    if chip is None:
        return {}
    if not isinstance(chip, Mapping):
        errors.append(f"chip must map figure names to {{value, source}}, got {chip!r}")
        return {}
    out = {}
    for name, entry in chip.items():
        if name not in CHIP_FIGURES:
            errors.append(f"chip.{name} is unknown; the figures are {list(CHIP_FIGURES)}")
            continue
        value = entry.get("value") if isinstance(entry, Mapping) else None
        source = entry.get("source") if isinstance(entry, Mapping) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or not isinstance(source, str) \
                or not source.strip():
            errors.append(f"chip.{name} must be {{value: positive number, source: where it was published}}, got {entry!r}")
            continue
        out[name] = (float(value), source.strip())
    return out


def _mesh_part(mesh: Any, part: str, errors: list[str]) -> dict[str, int]:
    if not isinstance(mesh, Mapping):
        errors.append(f"mesh must be a mapping with ici and dcn parts, got {mesh!r}")
        return {axis: 1 for axis in MESH_AXES}
    sizes = mesh.get(part) or {}
    if not isinstance(sizes, Mapping):
        errors.append(f"mesh.{part} must map axis names to sizes, got {sizes!r}")
        return {axis: 1 for axis in MESH_AXES}
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        errors.append(f"mesh.{part} has unknown axes {unknown}; the axes are {list(MESH_AXES)}")
    out = {}
    for axis in MESH_AXES:
        size = sizes.get(axis, 1)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            errors.append(f"mesh.{part}.{axis} must be a positive integer (presets give exact sizes), got {size!r}")
            size = 1
        out[axis] = size
    return out


# ---------------------------------------------------------------------------------------------- runtime check


def check_against_devices(preset: TpuPreset, num_devices: int, process_count: int = 1) -> None:
    """Raises TpuPresetError unless the run has the devices and processes (hosts) the preset describes.

    Args:
        num_devices: jax.device_count() (all processes).
        process_count: jax.process_count().
    """
    problems = []
    if num_devices != preset.devices:
        problems.append(f"{preset.devices} devices")
    if process_count != preset.hosts:
        problems.append(f"{_plural(preset.hosts, 'host process')}")
    if not problems:
        return
    per_host = f"{num_devices // process_count}" if process_count and num_devices % process_count == 0 else "?"
    raise TpuPresetError(
        f"tpu_config={preset.name!r} expects {' and '.join(problems)} "
        f"({preset.chips} chips x {preset.devices_per_chip} device/chip = {_plural(preset.devices, 'device')}, "
        f"{preset.devices_per_host} per host on {_plural(preset.hosts, 'host')}), but found "
        f"{_plural(num_devices, 'device')} in {_plural(process_count, 'process')} ({per_host} per process). "
        f"Choose the preset for this machine (see `xtrainer info`), start every host of a multi-host slice, "
        f"or drop tpu_config and set mesh."
    )
