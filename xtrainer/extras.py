"""Optional dependencies: which pip extra provides what, and the one-line error when one is missing.

xtrainer's core (`pip install xtrainer`) needs numpy, pyyaml, tqdm and safetensors only. Every other
library is imported where a feature needs it, through `require`, so a missing one fails with a single
line naming the feature and the extra that installs it, e.g.

    xtrainer plot needs matplotlib, which is not installed: pip install 'xtrainer[plot]'

The extras themselves are declared in pyproject.toml; `EXTRAS` below mirrors them (a test checks that
the two agree).
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: extra -> the importable modules it provides (what `require` checks), as declared in pyproject.toml.
EXTRAS: dict[str, tuple[str, ...]] = {
    "torch": ("torch", "transformers"),
    "jax": ("jax", "flax", "optax", "orbax.checkpoint"),
    "xla": ("torch_xla", "torchax", "jax", "flax", "optax", "orbax.checkpoint"),
    "hub": ("huggingface_hub", "transformers"),
    "plot": ("matplotlib",),
    "memory": ("psutil",),
    "tensorboard": ("tensorboard",),
    "wandb": ("wandb",),
    "optuna": ("optuna",),
    "plan": ("libtpu", "jax", "flax", "optax", "orbax.checkpoint"),  # xtrainer plan: the TPU compiler
    # torch-optimi's module is `optimi`; the table lists modules named like their distribution.
    "optimizers": ("schedulefree", "galore_torch", "lomo_optim", "apollo_torch", "grokadamw", "bitsandbytes", "torchao"),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed. The message is one line: feature, module, pip command."""


def install_hint(extra: str) -> str:
    return f"pip install 'xtrainer[{extra}]'"


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Imports `module`, or raises MissingExtraError naming `feature` and the extra to install.

    Args:
        module: the module to import ("matplotlib", "huggingface_hub", ...).
        extra: the pip extra of xtrainer that installs it (a key of EXTRAS).
        feature: what needs it, as the user wrote it ("xtrainer plot", "push_to_hub=True", ...).

    Example:
        >>> require("json", "plot", "a test").__name__
        'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or module
        if not (missing == module or module.startswith(missing + ".") or missing.startswith(module + ".")):
            raise  # the module exists but something it imports is broken: show the real error
        raise MissingExtraError(f"{feature} needs {module}, which is not installed: {install_hint(extra)}") from None


__all__ = ["EXTRAS", "MissingExtraError", "install_hint", "require"]
