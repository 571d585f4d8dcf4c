"""Reporting integrations: the callbacks that `TrainingArguments.report_to` names.

Each integration is a `TrainerCallback` in its own module, imported only when it is used:

| name          | callback              | writes                                                    |
| ------------- | --------------------- | --------------------------------------------------------- |
| `tensorboard` | `TensorBoardCallback` | TensorBoard event files under `output_dir/runs/...`        |
| `jsonl`       | `JsonlCallback`       | `output_dir/log_history.jsonl`, one JSON object per log    |
| `wandb`       | `WandbCallback`       | a Weights & Biases run (honours `WANDB_MODE=offline`)      |
| `kubeflow`    | `KubeflowCallback`    | progress posts to the Kubeflow Trainer controller; added to report_to by itself inside a Kubeflow TrainJob |

`report_to="all"` means every installed one, `"none"` / `None` / `[]` nothing (transformers'
default is `"none"`, and so is ours).
"""

from __future__ import annotations

import importlib
import importlib.util

from ..extras import MissingExtraError, install_hint

# name -> (module, callback class, packages it needs); each package's pip extra of xtrainer has its name.
_INTEGRATIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "tensorboard": ("xtrainer.integrations.tensorboard", "TensorBoardCallback", ("tensorboard",)),
    "jsonl": ("xtrainer.integrations.jsonl", "JsonlCallback", ()),
    "wandb": ("xtrainer.integrations.wandb", "WandbCallback", ("wandb",)),
    "kubeflow": ("xtrainer.integrations.kubeflow", "KubeflowCallback", ()),
}


def _environment_ready(name: str) -> bool:
    """Integrations that only work inside a given environment (Kubeflow's controller)."""
    if name == "kubeflow":
        from .kubeflow import kubeflow_requested

        return kubeflow_requested()
    return True


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def integration_names() -> list[str]:
    """Every integration name report_to accepts (besides "all" and "none")."""
    return list(_INTEGRATIONS)


def available_integrations() -> list[str]:
    """The integrations whose packages are installed here (what report_to="all" reports to)."""
    return [name for name, (_, _, needs) in _INTEGRATIONS.items()
            if all(_installed(p) for p in needs) and _environment_ready(name)]


def resolve_report_to(report_to) -> list[str]:
    """Normalises report_to (None, a name, or a list of names) to a list of integration names.

    Raises:
        ValueError: for a name that is not an integration, listing the valid ones.
    """
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if "all" in names:
        return available_integrations()
    resolved = []
    for name in names:
        if name == "none" or name in resolved:
            continue
        if name not in _INTEGRATIONS:
            valid = ", ".join(repr(n) for n in [*_INTEGRATIONS, "all", "none"])
            raise ValueError(f"report_to={name!r} is not a known integration; choose from {valid}.")
        resolved.append(name)
    return resolved


def get_reporting_integration_callbacks(report_to) -> list[type]:
    """The callback classes for report_to (transformers' function of the same name).

    Raises:
        ValueError: for an unknown name.
        ImportError: when a named integration's package is not installed.
    """
    callbacks = []
    for name in resolve_report_to(report_to):
        module_name, class_name, needs = _INTEGRATIONS[name]
        missing = [p for p in needs if not _installed(p)]
        if missing:
            raise MissingExtraError(f"report_to={name!r} needs {', '.join(missing)}, "
                                    f"{'which is' if len(missing) == 1 else 'which are'} not installed: "
                                    f"{install_hint(missing[0])} (or drop {name!r} from report_to)")
        callbacks.append(getattr(importlib.import_module(module_name), class_name))
    return callbacks


def reporting_callbacks(report_to, is_main_process: bool = True) -> list[type]:
    """The Trainer's hook: the callbacks for report_to on the main process, none on the others.

    Names are checked on every process, so a typo fails everywhere alike.
    """
    callbacks = get_reporting_integration_callbacks(report_to)
    return callbacks if is_main_process else []


__all__ = [
    "available_integrations",
    "get_reporting_integration_callbacks",
    "integration_names",
    "reporting_callbacks",
    "resolve_report_to",
]
