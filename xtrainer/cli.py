"""The `xtrainer` command (also `python -m xtrainer`).

Subcommands:
  info   what this environment offers: backends, devices, library versions, what backend="auto"
         picks for a torch and a Flax model, and the TPU presets.
  plot   OUTPUT_DIR [-o PATH]: a PNG of a run's loss, learning-rate and eval curves (plotting.py).
  plan   --tpu-config PRESET --model NAME: compile the train step for a TPU preset on this machine and
         report memory, FLOPs, collectives and shardings per device (planning/command.py).

Add a subcommand by writing `_cmd_<name>(args) -> int` and registering it in `build_parser`.
Every probe guards its imports: a missing library is reported, never raised.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from .extras import MissingExtraError

# (label, distribution names to try) for the version table.
VERSIONED = (
    ("xtrainer", ("xtrainer",)),
    ("numpy", ("numpy",)),
    ("torch", ("torch",)),
    ("jax", ("jax",)),
    ("jaxlib", ("jaxlib",)),
    ("libtpu", ("libtpu", "libtpu-nightly")),
    ("flax", ("flax",)),
    ("optax", ("optax",)),
    ("orbax", ("orbax-checkpoint",)),
    ("transformers", ("transformers",)),
    ("torch_xla", ("torch_xla", "torch-xla")),
    ("torchax", ("torchax",)),
)
DEVICE_PROBES = ("jax", "torch", "torch_xla")
_MAX_LISTED = 16


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"error: {type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# ---------------------------------------------------------------------------------------------- probes


def package_versions() -> dict[str, str | None]:
    """label -> installed version (None when not installed); python included. Imports nothing heavy."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for label, dists in VERSIONED:
        versions[label] = None
        for dist in dists:
            try:
                versions[label] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        if label == "xtrainer" and versions[label] is None:  # a source checkout that is not installed
            from . import __version__

            versions[label] = f"{__version__} (source)"
    return versions


def backend_status() -> dict[str, str]:
    """Each known backend -> "available" or the reason it is not (the registry's own message)."""
    from .backends.registry import _KNOWN, resolve_backend_name

    status = {}
    for name in _KNOWN:
        try:
            resolve_backend_name(name, None)
            status[name] = "available"
        except ValueError as exc:
            status[name] = str(exc)
    return status


def _listing(items: Sequence[str]) -> list[str]:
    if len(items) <= _MAX_LISTED:
        return list(items)
    return list(items[:_MAX_LISTED]) + [f"... ({len(items) - _MAX_LISTED} more)"]


def probe_jax_devices() -> dict[str, Any]:
    if not _importable("jax"):
        return {"status": "jax not installed"}
    try:
        import jax

        devices = jax.devices()
        return {
            "status": "ok",
            "platform": jax.default_backend(),
            "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(),
            "process_count": jax.process_count(),
            "devices": _listing([f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip() for d in devices]),
        }
    except Exception as exc:  # noqa: BLE001 - a probe reports, it never raises
        return {"status": _error(exc)}


def probe_torch_devices() -> dict[str, Any]:
    if not _importable("torch"):
        return {"status": "torch not installed"}
    try:
        import torch

        if not torch.cuda.is_available():
            build = "CUDA build" if torch.version.cuda else "CPU-only build"
            return {"status": f"no CUDA devices (torch {torch.__version__}, {build})", "cuda_device_count": 0}
        count = torch.cuda.device_count()
        return {
            "status": "ok",
            "cuda_device_count": count,
            "devices": _listing([f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(count)]),
        }
    except Exception as exc:  # noqa: BLE001
        return {"status": _error(exc)}


def probe_torch_xla_devices() -> dict[str, Any]:
    if not _importable("torch_xla"):
        return {"status": "torch_xla not installed"}
    try:
        from .backends.torch_xla.devices import list_devices

        info = list_devices()
        return {**info, "devices": _listing(info["devices"])}
    except Exception as exc:  # noqa: BLE001
        return {"status": _error(exc)}


def device_info(skip: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Devices as each installed library sees them; `skip` names probes not to run.

    torch_xla is not probed after JAX has opened a TPU in this process (one process owns the TPU);
    run `xtrainer info --skip-devices jax` to see torch_xla's view.
    """
    skip = set(skip)
    out: dict[str, dict[str, Any]] = {}
    for name, probe in (("jax", probe_jax_devices), ("torch", probe_torch_devices),
                        ("torch_xla", probe_torch_xla_devices)):
        if name in skip:
            out[name] = {"status": "skipped"}
        elif name == "torch_xla" and out.get("jax", {}).get("platform") == "tpu" and _importable("torch_xla"):
            out[name] = {"status": "not probed: JAX holds the TPU in this process (use --skip-devices jax)"}
        else:
            out[name] = probe()
    return out


def auto_backend_choices() -> dict[str, str]:
    """What backend="auto" resolves to for a tiny torch.nn.Linear and a tiny flax nnx.Linear."""
    from .backends.registry import resolve_backend_name

    choices = {}
    if _importable("torch"):
        try:
            import torch

            choices["torch.nn.Linear"] = resolve_backend_name("auto", torch.nn.Linear(2, 2))
        except Exception as exc:  # noqa: BLE001
            choices["torch.nn.Linear"] = _error(exc)
    else:
        choices["torch.nn.Linear"] = "torch not installed"
    if _importable("flax"):
        try:
            from flax import nnx

            def build():
                return nnx.Linear(2, 2, rngs=nnx.Rngs(0))

            # eval_shape builds the module abstractly: no device (and no TPU) is touched.
            model = nnx.eval_shape(build) if hasattr(nnx, "eval_shape") else build()
            choices["flax.nnx.Linear"] = resolve_backend_name("auto", model)
        except Exception as exc:  # noqa: BLE001
            choices["flax.nnx.Linear"] = _error(exc)
    else:
        choices["flax.nnx.Linear"] = "flax not installed"
    return choices


def pod_routes() -> dict[str, str]:
    """What backend="auto" runs each kind of model on, on a single-host and a multi-host TPU slice."""
    from .backends.registry import pod_backend

    routes = {}
    for kind, label in (("torch", "torch model"), ("flax", "Flax model")):
        for hosts, where in ((1, "single-host TPU"), (2, "multi-host TPU pod")):
            backend, reason = pod_backend(kind, hosts)
            routes[f"{label}, {where}"] = f"{backend} ({reason})"
    return routes


def preset_info() -> dict[str, str]:
    """Preset name -> one-line summary (or the error that stops it loading)."""
    from .tpu_presets import list_presets, load_preset

    out = {}
    for name in list_presets():
        try:
            out[name] = load_preset(name).summary()
        except ValueError as exc:
            out[name] = _error(exc)
    return out


def collect_info(skip_devices: Iterable[str] = ()) -> dict[str, Any]:
    """Everything `xtrainer info` reports, as plain data."""
    from .backends import available_backends, registry

    detect = getattr(registry, "detect_accelerator", None)  # what backend="auto" sees, without starting a runtime
    try:
        accelerator = detect() if detect is not None else None
    except Exception as exc:  # noqa: BLE001
        accelerator = _error(exc)
    return {
        "python": {"version": platform.python_version(), "executable": sys.executable,
                   "platform": platform.platform()},
        "versions": package_versions(),
        "backends": {"available": available_backends(), "status": backend_status(), "accelerator": accelerator},
        "devices": device_info(skip_devices),
        "auto_backend": auto_backend_choices(),
        "tpu_routes": pod_routes(),
        "tpu_presets": preset_info(),
    }


def format_info(info: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = ["xtrainer info", ""]
    py = info["python"]
    lines += [f"Python {py['version']} ({py['executable']}) on {py['platform']}", ""]

    lines.append("Versions:")
    width = max(len(k) for k in info["versions"])
    for label, version in info["versions"].items():
        lines.append(f"  {label:<{width}}  {version or 'not installed'}")
    lines.append("")

    backends = info["backends"]
    lines.append(f"Backends available: {', '.join(backends['available']) or 'none'}")
    for name, status in backends["status"].items():
        lines.append(f"  {name:<10} {status}")
    if backends.get("accelerator"):
        lines.append(f"Accelerator (as backend='auto' sees it): {backends['accelerator']}")
    lines.append("")

    lines.append("Devices:")
    for name, dev in info["devices"].items():
        status = dev.get("status")
        if status != "ok":
            lines.append(f"  {name}: {status}")
            continue
        if name == "jax":
            lines.append(f"  jax: platform={dev['platform']} devices={dev['device_count']} "
                         f"local={dev['local_device_count']} processes={dev['process_count']}")
        elif name == "torch":
            lines.append(f"  torch: {dev['cuda_device_count']} CUDA device(s)")
        else:
            lines.append(f"  torch_xla: device_type={dev['device_type']} devices={dev['device_count']}")
        lines += [f"    {d}" for d in dev.get("devices", [])]
    lines.append("")

    lines.append('backend="auto" picks:')
    for model, choice in info["auto_backend"].items():
        lines.append(f"  {model:<16} -> {choice}")
    for where, route in info.get("tpu_routes", {}).items():
        lines.append(f"  {where:<34} -> {route}")
    lines.append("")

    presets = info["tpu_presets"]
    lines.append(f"TPU presets ({len(presets)}; TrainingArguments(tpu_config=NAME)):")
    width = max((len(n) for n in presets), default=0)
    for name, summary in presets.items():
        lines.append(f"  {name:<{width}}  {summary}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- commands


def _cmd_info(args: argparse.Namespace) -> int:
    skip = set(DEVICE_PROBES) if args.no_devices else {s.strip() for s in args.skip_devices.split(",") if s.strip()}
    unknown = skip - set(DEVICE_PROBES)
    if unknown:
        print(f"xtrainer info: unknown --skip-devices {sorted(unknown)}; choose from {list(DEVICE_PROBES)}",
              file=sys.stderr)
        return 2
    info = collect_info(skip)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plotting import plot_training_curves

    try:
        path = plot_training_curves(args.output_dir, args.output)
    except (FileNotFoundError, ValueError) as exc:
        print(f"xtrainer plot: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xtrainer", description="xtrainer command line tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="backends, devices, versions, auto backend choice and TPU presets",
                          description="Report what this environment offers xtrainer.")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.add_argument("--skip-devices", default="", metavar="LIST",
                      help=f"comma-separated device probes not to run: {', '.join(DEVICE_PROBES)}")
    info.add_argument("--no-devices", action="store_true", help="run no device probe")
    info.set_defaults(func=_cmd_info)

    plot = sub.add_parser("plot", help="PNG of the loss, learning-rate and eval curves of a run",
                          description="Plot a run's curves from its trainer_state.json (or, for a run in progress, "
                                      "its newest checkpoint or log_history.jsonl).")
    plot.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's output_dir")
    plot.add_argument("-o", "--output", metavar="PATH", default=None,
                      help="where to write the PNG (default: OUTPUT_DIR/training_curves.png)")
    plot.set_defaults(func=_cmd_plot)

    from .planning.command import add_parser as add_plan_parser

    add_plan_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except MissingExtraError as exc:  # one line naming the extra to install, not a traceback
        print(exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
