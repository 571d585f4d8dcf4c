"""pytest plugin: point transformers' Trainer-API names at xtrainer's, for the conformance runs.

Loaded with `pytest -p conformance_redirect` (tools/conformance/ on PYTHONPATH) in front of transformers'
own `tests/trainer/` files, which stay unmodified. Environment:

- `XTRAINER_CONFORMANCE=control`: redirect nothing; the same run against transformers itself.
- `XTRAINER_CONFORMANCE=xtrainer` (default): before any test module is imported, the Trainer-API names
  that xtrainer provides replace transformers' in `transformers` and in its trainer submodules, so a
  test's `from transformers import Trainer` or `from transformers.trainer_callback import TrainerState`
  gets xtrainer's class.
- `XTRAINER_CONFORMANCE_BACKEND=torch|jax|torch_xla`: every `TrainingArguments` left at
  `backend="auto"` gets this backend instead (xtrainer runs only).
- `XTRAINER_CONFORMANCE_REPORT=<file>`: where to write the JSON record of what was redirected.

Which names move: a public name `N` of a transformers module is replaced when xtrainer's counterpart
module defines `N` itself (see COUNTERPARTS), or, for the top-level `transformers` namespace, when `N`
is in `xtrainer.__all__`. transformers' own trainer modules are imported before the swap, so the
objects transformers builds internally (its Trainer, its integrations' callbacks) keep their own
classes; only what a test module imports afterwards changes. Tests that patch transformers internals
(`mock.patch("transformers.trainer....")`) therefore keep patching transformers, not xtrainer: those
tests fail on xtrainer by construction and the summariser files them as private-internals tests.
"""

from __future__ import annotations

import importlib
import json
import os

# transformers module -> xtrainer modules whose own (not re-imported) public names replace its names.
COUNTERPARTS = {
    "transformers.trainer": ("xtrainer.trainer",),
    "transformers.trainer_seq2seq": ("xtrainer.seq2seq",),
    "transformers.training_args": ("xtrainer.training_args", "xtrainer.trainer_utils"),
    "transformers.training_args_seq2seq": ("xtrainer.training_args",),
    "transformers.trainer_callback": ("xtrainer.callbacks", "xtrainer.builtin_callbacks"),
    "transformers.trainer_utils": ("xtrainer.trainer_utils", "xtrainer.hyperparameter_search"),
    "transformers.hyperparameter_search": ("xtrainer.hyperparameter_search",),
}

# transformers modules imported before the swap so that transformers' own objects keep its classes.
PRELOAD = (
    "transformers.trainer",
    "transformers.trainer_seq2seq",
    "transformers.integrations.integration_utils",
)


def _own_public_names(module) -> dict[str, object]:
    """Public names that `module` defines itself (classes, functions, enums), not ones it imported."""
    names = {}
    for name, obj in vars(module).items():
        if name.startswith("_"):
            continue
        defined_in = getattr(obj, "__module__", None)
        if defined_in is not None and defined_in.startswith("xtrainer"):
            names[name] = obj
    return names


def redirect() -> dict[str, list[str]]:
    """Replace transformers' Trainer-API names with xtrainer's. Returns {transformers module: [names]}."""
    import transformers
    import xtrainer

    moved: dict[str, list[str]] = {}

    top = []
    for name in xtrainer.__all__:
        if hasattr(transformers, name):
            setattr(transformers, name, getattr(xtrainer, name))
            top.append(name)
    moved["transformers"] = sorted(top)

    for t_name, x_names in COUNTERPARTS.items():
        t_mod = importlib.import_module(t_name)
        ours: dict[str, object] = {}
        for x_name in x_names:
            ours.update({k: v for k, v in _own_public_names(importlib.import_module(x_name)).items() if k not in ours})
        names = [n for n in ours if not n.startswith("_") and hasattr(t_mod, n)]
        for n in names:
            setattr(t_mod, n, ours[n])
        moved[t_name] = sorted(names)
    return moved


def _force_backend(backend: str) -> None:
    """Make every TrainingArguments left at backend="auto" use `backend` (subclasses included)."""
    from xtrainer.training_args import TrainingArguments

    original = TrainingArguments.__post_init__

    def __post_init__(self):
        if str(getattr(self, "backend", "auto")) == "auto":
            self.backend = backend
        original(self)

    TrainingArguments.__post_init__ = __post_init__


# Names the 5.16.0.dev0 tests import that other transformers releases (5.15, 5.24) lack. A stand-in
# that raises when used lets the rest of the file run; the tests that use it fail in both modes alike,
# so they drop out of the control-passing set. Applied in control and xtrainer runs.
VERSION_SHIMS = {"transformers": ("GlueDataset", "GlueDataTrainingArguments")}


def _missing_in_this_release(name: str):
    class Missing:
        def __init__(self, *args, **kwargs):
            raise NotImplementedError(f"transformers {name} is not in this transformers release (conformance shim)")

    Missing.__name__ = name
    return Missing


def add_version_shims() -> list[str]:
    """Give transformers the names listed in VERSION_SHIMS that this release lacks. Returns those added."""
    added = []
    for module_name, names in VERSION_SHIMS.items():
        module = importlib.import_module(module_name)
        for name in names:
            try:
                getattr(module, name)
            except (AttributeError, ImportError):
                setattr(module, name, _missing_in_this_release(name))
                added.append(f"{module_name}.{name}")
    return added


_RECORD: dict = {}


def pytest_configure(config):
    mode = os.environ.get("XTRAINER_CONFORMANCE", "xtrainer")
    if mode not in ("control", "xtrainer"):
        raise ValueError(f"XTRAINER_CONFORMANCE={mode!r}: expected 'control' or 'xtrainer'")
    import transformers

    _RECORD.update(mode=mode, transformers_version=transformers.__version__, redirected={}, backend=None)
    # Both modes import the same transformers modules up front: importing them later can swap the
    # `transformers` object in sys.modules (seen on 5.24), which would drop the names set below.
    for name in PRELOAD:
        importlib.import_module(name)
    _RECORD["version_shims"] = add_version_shims()
    if mode == "xtrainer":
        _RECORD["redirected"] = redirect()
        backend = os.environ.get("XTRAINER_CONFORMANCE_BACKEND")
        if backend:
            _force_backend(backend)
            _RECORD["backend"] = backend
    report = os.environ.get("XTRAINER_CONFORMANCE_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump(_RECORD, f, indent=1)


def pytest_report_header(config):
    lines = [f"conformance mode: {_RECORD.get('mode')} (transformers {_RECORD.get('transformers_version')})"]
    if _RECORD.get("backend"):
        lines.append(f"conformance backend forced: {_RECORD['backend']}")
    if _RECORD.get("version_shims"):
        lines.append(f"stand-ins for names this transformers lacks: {', '.join(_RECORD['version_shims'])}")
    for module, names in _RECORD.get("redirected", {}).items():
        lines.append(f"redirected {module}: {', '.join(names) or '-'}")
    return lines
