"""full_determinism on the JAX backend: XLA's deterministic options reach every compilation (XLA_FLAGS when
TrainingArguments comes before JAX starts, per-compilation options for the Trainer's steps in any case),
and two seeded runs on CPU are bitwise equal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import xtrainer  # noqa: E402
from xtrainer.backends.jax import determinism  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def test_flags_reach_the_compiler_and_two_runs_are_bitwise_equal(tmp_path):
    """A fresh process: TrainingArguments(full_determinism=True) before JAX starts puts the flag in XLA_FLAGS;
    XLA's dump of every compiled module (the train step and JAX's own small programs) lists it as set."""
    dump = tmp_path / "xla_dump"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 --xla_dump_to={dump}", "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(HERE / "determinism_run.py"), str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert "--xla_gpu_deterministic_ops=true" in result["xla_flags"].split()
    assert result["devices"] == 4
    options = {path.name: path.read_text() for path in dump.glob("*.debug_options")}
    train_steps = [name for name in options if "train_step" in name]
    assert train_steps and len(options) > len(train_steps)  # the step and other programs of the process
    for name, text in options.items():
        assert "xla_gpu_deterministic_ops: true" in text, name
    first, second = result["runs"]
    assert len(first["losses"]) == 4 and first["losses"][0] != first["losses"][-1]
    assert first == second  # losses and every parameter bit


def _spy_compilations(monkeypatch) -> list:
    """The compiler_options of every train-step compilation and every eval-step jit."""
    seen = []
    real_compile, real_jit = jax.stages.Lowered.compile, jax.jit

    def compile(self, compiler_options=None, **kw):
        seen.append(("compile", compiler_options))
        return real_compile(self, compiler_options=compiler_options, **kw)

    def jit(fn, *args, **kw):
        if getattr(fn, "__name__", "") == "eval_step":
            seen.append(("jit", kw.get("compiler_options")))
        return real_jit(fn, *args, **kw)

    monkeypatch.setattr(jax.stages.Lowered, "compile", compile)
    monkeypatch.setattr(jax, "jit", jit)
    return seen


@pytest.mark.parametrize("full_determinism", [True, False])
def test_trainer_steps_compile_with_the_options_after_jax_started(tmp_path, monkeypatch, full_determinism):
    from flax import nnx
    from jax_models import RegressionMLP, regression_rows

    jax.devices()  # JAX has started (the late case): only per-compilation options can act
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    before = os.environ["XLA_FLAGS"]
    seen = _spy_compilations(monkeypatch)
    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax", full_determinism=full_determinism, max_steps=1,
                                      per_device_train_batch_size=1, report_to="none", disable_tqdm=True,
                                      save_strategy="no")
    assert os.environ["XLA_FLAGS"] == before  # too late for the process flags: left alone
    rows = regression_rows(16)
    trainer = xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=args, train_dataset=rows, eval_dataset=rows[:8])
    trainer.train()
    trainer.evaluate()
    expected = {"xla_gpu_deterministic_ops": True} if full_determinism else None
    assert ("compile", expected) in seen and ("jit", expected) in seen
    assert all(options == expected for _, options in seen)


def test_process_flags_are_added_only_before_jax_starts(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setattr(determinism, "_jax_started", lambda: False)
    assert determinism.request_process_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 --xla_gpu_deterministic_ops=true"
    assert determinism.request_process_flags()  # idempotent
    assert os.environ["XLA_FLAGS"].count("xla_gpu_deterministic_ops") == 1
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=false")  # the user's explicit choice stands
    determinism.request_process_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_deterministic_ops=false"
    monkeypatch.setattr(determinism, "_jax_started", lambda: True)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert not determinism.request_process_flags() and os.environ["XLA_FLAGS"] == ""


def test_the_compiler_rejects_unknown_options_so_accepted_ones_are_read():
    """Guards the test above: XLA validates per-compilation option names, so ours are real DebugOptions fields."""
    lowered = jax.jit(lambda x: x * 2).lower(np.ones(3, np.float32))
    lowered.compile(compiler_options=determinism.DETERMINISTIC_OPTIONS)
    with pytest.raises(Exception, match="No such compile option"):
        lowered.compile(compiler_options={"xla_gpu_no_such_option": True})
