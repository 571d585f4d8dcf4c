"""`xtrainer info` (xtrainer/cli.py): the subprocess entry point and each probe, with libraries missing too."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from xtrainer import cli
from xtrainer.backends import available_backends
from xtrainer.tpu_presets import list_presets

REPO = Path(__file__).resolve().parents[2]


def test_python_m_xtrainer_info_runs_and_reports_everything():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    # torch_xla's device probe alone costs ~15 s of imports; test_torch_xla_probe covers it with a fake module.
    proc = subprocess.run(
        [sys.executable, "-m", "xtrainer", "info", "--skip-devices", "torch_xla"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"Backends available: {', '.join(available_backends())}" in out
    for label in ("python", "torch", "jax", "flax", "optax", "orbax", "transformers", "torch_xla", "torchax"):
        assert f"\n  {label} " in out, label
    for name in list_presets():
        assert f"\n  {name} " in out, name
    assert "Devices:" in out and "torch_xla: skipped" in out
    assert 'backend="auto" picks:' in out
    if "jax" in available_backends():
        assert "devices=8" in out  # the subprocess inherits the 8 fake CPU devices from tests/conftest.py


def test_info_json_has_every_section(capsys):
    assert cli.main(["info", "--json", "--no-devices"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == {"python", "versions", "backends", "devices", "auto_backend", "tpu_routes", "tpu_presets"}
    assert info["versions"]["python"] == info["python"]["version"]
    assert info["backends"]["available"] == available_backends()
    assert set(info["backends"]["status"]) == {"jax", "torch", "torch_xla"}
    assert all(dev == {"status": "skipped"} for dev in info["devices"].values())
    assert list(info["tpu_presets"]) == list_presets()


def test_versions_report_missing_distributions(monkeypatch):
    monkeypatch.setattr(cli, "VERSIONED", cli.VERSIONED + (("ghost", ("no-such-dist-xtrainer-test",)),))
    versions = cli.package_versions()
    assert versions["ghost"] is None
    assert versions["xtrainer"].startswith("0.") and versions["python"].count(".") == 2


def test_auto_backend_choices():
    choices = cli.auto_backend_choices()
    if "torch" in available_backends():
        assert choices["torch.nn.Linear"] == "torch"
    if "jax" in available_backends():
        assert choices["flax.nnx.Linear"] == "jax"


def test_nothing_installed_is_reported_not_raised(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_importable", lambda module: False)
    devices = cli.device_info()
    assert devices == {
        "jax": {"status": "jax not installed"},
        "torch": {"status": "torch not installed"},
        "torch_xla": {"status": "torch_xla not installed"},
    }
    assert cli.auto_backend_choices() == {
        "torch.nn.Linear": "torch not installed",
        "flax.nnx.Linear": "flax not installed",
    }
    info = cli.collect_info()
    text = cli.format_info(info)
    assert "jax: jax not installed" in text and "flax.nnx.Linear  -> flax not installed" in text


def _fake_torch_xla(monkeypatch, devices):
    runtime = types.ModuleType("torch_xla.runtime")
    runtime.device_type = lambda: "TPU"
    module = types.ModuleType("torch_xla")
    module.runtime = runtime
    module.devices = devices
    monkeypatch.setitem(sys.modules, "torch_xla", module)
    monkeypatch.setitem(sys.modules, "torch_xla.runtime", runtime)
    monkeypatch.setattr(cli, "_importable", lambda name: True)


def test_torch_xla_probe(monkeypatch):
    _fake_torch_xla(monkeypatch, lambda: ["xla:0", "xla:1"])
    assert cli.probe_torch_xla_devices() == {
        "status": "ok", "device_type": "TPU", "device_count": 2, "devices": ["xla:0", "xla:1"],
    }

    def broken():
        raise RuntimeError("TPU in use by another process\nmore detail")

    _fake_torch_xla(monkeypatch, broken)
    assert cli.probe_torch_xla_devices() == {"status": "error: RuntimeError: TPU in use by another process"}


def test_torch_cuda_probe(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    probe = cli.probe_torch_devices()
    assert probe == {"status": "ok", "cuda_device_count": 2,
                     "devices": ["cuda:0 NVIDIA H100 80GB HBM3", "cuda:1 NVIDIA H100 80GB HBM3"]}
    text = cli.format_info(dict(cli.collect_info(skip_devices={"jax", "torch_xla"}), devices={"torch": probe}))
    assert "torch: 2 CUDA device(s)\n    cuda:0 NVIDIA H100 80GB HBM3" in text


def test_torch_xla_is_not_probed_when_jax_holds_the_tpu(monkeypatch):
    monkeypatch.setattr(cli, "probe_jax_devices", lambda: {"status": "ok", "platform": "tpu"})
    monkeypatch.setattr(cli, "probe_torch_devices", lambda: {"status": "no CUDA devices"})
    monkeypatch.setattr(cli, "_importable", lambda name: True)
    assert "JAX holds the TPU" in cli.device_info()["torch_xla"]["status"]
    assert cli.device_info(skip={"torch"})["torch"] == {"status": "skipped"}


def test_long_device_lists_are_shortened(monkeypatch):
    listed = cli._listing([f"tpu:{i}" for i in range(256)])
    assert len(listed) == cli._MAX_LISTED + 1 and listed[-1] == f"... ({256 - cli._MAX_LISTED} more)"


def test_bad_invocations(capsys):
    assert cli.main([]) == 2  # no subcommand: help
    assert "info" in capsys.readouterr().out
    assert cli.main(["info", "--skip-devices", "tpu"]) == 2
    assert "unknown --skip-devices ['tpu']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["nope"])
