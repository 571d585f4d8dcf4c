"""Packaging: the pip extras in pyproject.toml, and the one-line error naming the extra when an optional library is
missing (simulated by hiding the module: sys.modules[name] = None makes its import fail)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tomllib

import pytest

import xtrainer
from helpers import RegressionModel
from xtrainer import cli
from xtrainer.extras import EXTRAS, MissingExtraError, require

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _one_line(message: str, extra: str) -> None:
    assert "\n" not in message
    assert f"pip install 'xtrainer[{extra}]'" in message


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_extras_table_matches_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["optional-dependencies"]
    assert set(EXTRAS) == set(declared) - {"all", "dev"}
    for extra, modules in EXTRAS.items():
        distributions = {_normalise(re.split(r"[<>=!~ ;\[]", spec)[0]) for spec in declared[extra]}
        for module in modules:
            assert _normalise(module) in distributions, (extra, module)
    bundled = re.search(r"xtrainer\[(.*)\]", declared["all"][0]).group(1).split(",")
    # all but the torch_xla stack, whose torch pin differs, and the ~700 MB TPU compiler of `xtrainer plan`
    assert set(bundled) == set(EXTRAS) - {"xla", "plan"}


def test_require_names_the_feature_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError) as info:
        require("matplotlib", "plot", "xtrainer plot")
    assert str(info.value) == "xtrainer plot needs matplotlib, which is not installed: pip install 'xtrainer[plot]'"
    assert isinstance(info.value, ImportError)


def test_require_shows_a_broken_installation_as_it_is(monkeypatch, tmp_path):
    """A module that is there but fails to import for another reason is not reported as a missing extra."""
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("import a_dependency_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_does_not_exist"):
        require("brokenpkg", "plot", "a test")


def test_xtrainer_plot_without_matplotlib_prints_one_line(monkeypatch, tmp_path, capsys):
    (tmp_path / "trainer_state.json").write_text('{"log_history": [{"loss": 1.0, "step": 1}]}')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for name in [m for m in sys.modules if m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    assert cli.main(["plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    _one_line(err.strip(), "plot")
    assert err.startswith("xtrainer plot needs matplotlib")


def _args(tmp_path, **kw):
    return xtrainer.TrainingArguments(str(tmp_path), backend="torch", report_to="none", **kw)


def test_push_to_hub_without_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MissingExtraError) as info:
        xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path, push_to_hub=True))
    _one_line(str(info.value), "hub")
    assert str(info.value).startswith("push_to_hub needs huggingface_hub")


def test_memory_metrics_without_psutil(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "psutil", None)
    with pytest.raises(MissingExtraError) as info:
        xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path, skip_memory_metrics=False))
    _one_line(str(info.value), "memory")
    assert str(info.value).startswith("skip_memory_metrics=False needs psutil")


def test_report_to_without_its_package(monkeypatch, tmp_path):
    monkeypatch.setattr("xtrainer.integrations._installed", lambda package: package != "tensorboard")
    with pytest.raises(MissingExtraError) as info:
        xtrainer.Trainer(model=RegressionModel(), args=xtrainer.TrainingArguments(str(tmp_path), backend="torch",
                                                                                  report_to="tensorboard"))
    _one_line(str(info.value), "tensorboard")


def test_hyperparameter_search_without_optuna(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "optuna", None)
    trainer = xtrainer.Trainer(model_init=lambda: RegressionModel(), args=_args(tmp_path),
                               train_dataset=[{"input_x": 1.0, "labels": 1.0}])
    for backend in (None, "optuna"):
        with pytest.raises(MissingExtraError) as info:
            trainer.hyperparameter_search(backend=backend, n_trials=1)
        _one_line(str(info.value), "optuna")


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_every_extra_the_readme_names_is_declared():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = set(tomllib.load(f)["project"]["optional-dependencies"])
    readme = _readme()
    named = set()
    for group in re.findall(r"xtrainer\[([a-z_,]+)\]", readme):  # pip install 'xtrainer[torch,jax]'
        named.update(group.split(","))
    named.update(re.findall(r"extra `([a-z_]+)`", readme))  # "(extra `plot`)"
    named.update(re.findall(r"the `([a-z_]+)` extra", readme))
    rows = readme.split("| extra | installs | for |")[1].split("\n\n")[0]  # the extras table
    table = set(re.findall(r"^\| `([a-z_]+)`", rows, flags=re.M))
    table.update(re.findall(r"^\| `[a-z_]+`, `([a-z_]+)`", rows, flags=re.M))
    assert named and named <= declared, named - declared
    assert table == declared - {"dev"}, table ^ (declared - {"dev"})


HIDDEN = ("torch", "jax", "jaxlib", "flax", "optax", "orbax", "torch_xla", "torchax", "transformers", "huggingface_hub",
          "matplotlib", "psutil", "tensorboard", "wandb", "optuna", "accelerate", "datasets")


def test_the_readme_commands_on_a_core_install(tmp_path):
    """Every `xtrainer <command>` in the README runs with only the core dependencies (the optional libraries
    hidden in a fresh process), or stops with one line naming its extra."""
    (tmp_path / "trainer_state.json").write_text('{"log_history": [{"loss": 1.0, "step": 1}]}')
    commands = sorted(set(re.findall(r"`xtrainer ([a-z]+)", _readme())))
    assert "plot" in commands and "info" in commands
    parser_commands = {name for action in cli.build_parser()._actions
                       if isinstance(action, argparse._SubParsersAction) for name in action.choices}
    assert set(commands) <= parser_commands, set(commands) - parser_commands
    script = (f"import sys\nfor m in {HIDDEN!r}: sys.modules[m] = None\n"
              "from xtrainer.cli import main\nsys.exit(main(sys.argv[1:]))")
    expected = {"info": (0, None), "plot": (1, "plot"), "plan": (2, "plan")}
    arguments = {"plot": [str(tmp_path)], "plan": ["--tpu-config", "v5e-1", "--model", "llama-tiny"]}
    for command in commands:
        argv = [command] + arguments.get(command, [])
        done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
        code, extra = expected[command]
        assert done.returncode == code, (command, done.stderr[-2000:])
        if extra is not None:
            assert done.stderr.count("\n") == 1, done.stderr
            _one_line(done.stderr.strip(), extra)
