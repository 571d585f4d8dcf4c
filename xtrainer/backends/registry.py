"""Backend names -> implementations, and `backend="auto"` resolution.

Only backends whose dependencies import are offered; "auto" picks from the model's kind and the
accelerators present.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

_KNOWN = ("jax", "torch", "torch_xla")
_EXTRAS = {"jax": "jax", "torch": "torch", "torch_xla": "xla"}


def _torch_backend_factory():
    from .torch.backend import TorchBackend

    return TorchBackend


def _jax_backend_factory():
    from .jax.backend import JaxBackend

    return JaxBackend


# name -> (required importable modules, factory returning the Backend class)
_REGISTRY: dict[str, tuple[tuple[str, ...], Callable[[], type]]] = {
    "torch": (("torch",), _torch_backend_factory),
    "jax": (("jax", "flax", "optax", "orbax.checkpoint"), _jax_backend_factory),
    "torch_xla": (
        ("torch", "torch_xla"),
        lambda: importlib.import_module(".torch_xla.backend", __package__).TorchXlaBackend,
    ),
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a dotted name whose parent package is missing ("orbax.checkpoint" without orbax)
        return False


def available_backends() -> list[str]:
    """Registered backends whose dependencies are installed here."""
    return [name for name, (deps, _) in _REGISTRY.items() if all(_importable(d) for d in deps)]


def model_kind(model: Any) -> str:
    """'torch' for torch.nn.Module, 'flax' for Flax NNX/linen modules, else 'unknown'."""
    from ..model_wrappers import FunctionalModel, LinenModel

    if isinstance(model, (LinenModel, FunctionalModel)):
        return "flax"
    for klass in type(model).__mro__:
        module = klass.__module__ or ""
        if module.startswith("torch.nn") and klass.__name__ == "Module":
            return "torch"
        if module.startswith("flax."):
            return "flax"
    return "unknown"


def resolve_backend_name(requested: str, model: Any) -> str:
    """The backend for `requested` ("auto" or a name) and this model.

    Raises:
        ValueError: unknown name, a backend not available here, or no backend for this model.
    """
    requested = str(requested or "auto")
    if requested != "auto":
        if requested not in _KNOWN:
            raise ValueError(f"backend={requested!r} is unknown; choose one of: 'auto', {', '.join(map(repr, _KNOWN))}.")
        if requested not in _REGISTRY:
            raise ValueError(
                f"backend={requested!r} is not available in this version of xtrainer; "
                f"available: {', '.join(available_backends()) or 'none'}."
            )
        deps = _REGISTRY[requested][0]
        missing = [d for d in deps if not _importable(d)]
        if missing:
            raise ValueError(
                f"backend={requested!r} needs {', '.join(missing)}, {'which is' if len(missing) == 1 else 'which are'} "
                f"not installed: pip install 'xtrainer[{_EXTRAS[requested]}]'."
            )
        return requested
    kind = model_kind(model)
    available = available_backends()
    if kind == "flax" and "jax" in available:
        return "jax"
    if kind == "torch":
        # On a TPU host a torch model goes to torch_xla (torch eager cannot use the TPU), except on a
        # multi-host slice, where it goes to jax through torchax (see pod_backend); elsewhere native
        # torch runs it on CUDA/ROCm when present, else CPU. backend="jax" asks for torchax.
        if detect_accelerator() == "tpu":
            choice, _ = pod_backend(kind, tpu_host_count(), available)
            if choice in available:
                return choice
        if "torch" in available:
            return "torch"
    raise ValueError(
        f"backend='auto' found no backend for a {type(model).__name__} (a {kind} model); "
        f"available backends: {', '.join(available) or 'none'}. Pass backend=... explicitly."
    )


# torch_xla 2.9 runs SPMD in one process per slice host only: probed on the PJRT CPU device, two
# processes each saw only their own devices (process_count() == 1), so no global mesh forms.
MULTI_HOST_TORCH_ROUTE = (
    "torch_xla runs one host in this version; a PyTorch model on a multi-host TPU slice trains on the jax "
    "backend through torchax (backend='jax'), which runs one process per host over one global mesh"
)


def pod_backend(kind: str, hosts: int, available: list[str] | None = None) -> tuple[str, str]:
    """(backend, reason) for a model of this kind ("torch", "flax") on a TPU slice of `hosts` hosts."""
    available = available_backends() if available is None else available
    torchax = "jax" in available and _importable("torchax")
    if kind != "torch":
        return "jax", "Flax and JAX models train on the jax backend, one process per host"
    if hosts > 1:
        if torchax:
            return "jax", MULTI_HOST_TORCH_ROUTE
        return "jax", MULTI_HOST_TORCH_ROUTE + " (install torchax: pip install 'xtrainer[xla]')"
    if "torch_xla" in available:
        return "torch_xla", "a PyTorch model on a single-host TPU trains on torch_xla (SPMD over the host's chips)"
    if torchax:
        return "jax", "torch_xla is not installed: the PyTorch model trains on the jax backend through torchax"
    return "torch_xla", "a PyTorch model on a TPU needs torch_xla or torchax: pip install 'xtrainer[xla]'"


def tpu_host_count() -> int:
    """Hosts of the TPU slice this process runs on, judged from the environment (1 when unknown).

    TPU_WORKER_HOSTNAMES lists the slice's workers (GKE and multi-host TPU VMs set it); otherwise the
    accelerator type in TPU_ACCELERATOR_TYPE is looked up among the TPU presets.
    """
    workers = [w for w in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if w.strip()]
    if len(workers) > 1:
        return len(workers)
    accelerator = os.environ.get("TPU_ACCELERATOR_TYPE", "")
    if accelerator:
        from ..tpu_presets import list_presets, load_preset

        for name in list_presets():
            try:
                preset = load_preset(name)
            except ValueError:
                continue
            if preset.accelerator_type == accelerator and preset.num_slices == 1:
                return preset.hosts
    return 1


def detect_accelerator() -> str:
    """'tpu', 'gpu' or 'cpu': what this host has, judged without initialising any device runtime.

    TPU VMs expose /dev/accel* (v2-v4, v6e) or /dev/vfio (v5e/v5p) and set TPU_* variables; PJRT_DEVICE=TPU
    is torch_xla's own switch. GPUs are asked of torch when it is installed.
    """
    if os.environ.get("PJRT_DEVICE", "").upper() == "TPU" or os.environ.get("TPU_ACCELERATOR_TYPE"):
        return "tpu"
    if any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0")) and os.environ.get("PJRT_DEVICE", "").upper() != "CPU":
        return "tpu"
    if _importable("torch"):
        import torch

        if torch.cuda.is_available():
            return "gpu"
    return "cpu"


def get_backend(name: str) -> Any:
    """A fresh instance of the named backend."""
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is not registered; available: {', '.join(available_backends())}.")
    return _REGISTRY[name][1]()()


def early_setup(args) -> None:
    """Process-level setup that must happen before any model is built (called by TrainingArguments).

    Today: XLA's deterministic flags for full_determinism (read when JAX starts), and joining a
    multi-host JAX run when the environment asks for one.
    """
    if str(getattr(args, "backend", "auto")) in ("auto", "jax") and getattr(args, "full_determinism", False):
        from .jax.determinism import request_process_flags

        request_process_flags()
    if str(getattr(args, "backend", "auto")) in ("auto", "jax") and os.environ.get("JAX_COORDINATOR_ADDRESS"):
        from .jax.multihost import initialize_from_env

        initialize_from_env(args)
