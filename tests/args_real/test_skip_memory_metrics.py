"""skip_memory_metrics=False: the *_mem_* metrics of init, train, eval and predict, on every backend.

A callback allocates memory during training (kept, and freed again), so the reported deltas must
follow what really happened: `alloc` sees what is kept, `peaked` what came and went. The device probes'
arithmetic (a resettable CUDA-like peak, a JAX/XLA-like peak that cannot be reset) is checked with probes
that report given figures. xtrainer/args_support.py names these tests as the proof that the field acts.
"""

from __future__ import annotations

import importlib.util
import logging
import time

import numpy as np
import pytest

import xtrainer
from helpers import RegressionModel
from xtrainer.compat.memory_metrics import DeviceReading, MemoryTracker

psutil = pytest.importorskip("psutil")
MB = 1 << 20
KEPT, PASSING = 64 * MB, 96 * MB


def _model(kind: str):
    if kind == "jax":
        if importlib.util.find_spec("flax") is None:
            pytest.skip("flax is not installed")
        from flax import nnx

        from jax_models import RegressionMLP

        return RegressionMLP(nnx.Rngs(0))
    if kind == "torch_xla" and importlib.util.find_spec("torch_xla") is None:
        pytest.skip("torch_xla runs in the XLA lane")
    return RegressionModel(a=0.5, b=-0.5)


def _rows(n: int = 16) -> list[dict]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return [{"x": x[i], "input_x": float(x[i].sum()), "labels": float(x[i].sum())} for i in range(n)]


class Allocates(xtrainer.TrainerCallback):
    """Keeps KEPT bytes from the first step on; holds PASSING more for a moment in the second step; frees the
    kept bytes in the first evaluation after training."""

    kept = None
    free_on_evaluate = False

    def on_evaluate(self, args, state, control, **kwargs):
        if Allocates.free_on_evaluate:
            Allocates.kept, Allocates.free_on_evaluate = None, False

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            Allocates.kept = np.ones(KEPT // 8)  # pages touched: resident
        if state.global_step == 2:
            passing = np.ones(PASSING // 8)
            time.sleep(0.05)  # long enough for the 1 ms sampler
            del passing


def _run(tmp_path, kind: str, skip: bool):  # (the default, skip=True, adds no *_mem_* key: test_trainer_reports.py)
    per_device = 4 if kind == "torch" else 1
    args = xtrainer.TrainingArguments(
        str(tmp_path / f"{kind}-{skip}"), backend=kind, per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device, max_steps=3, logging_steps=1, eval_strategy="steps", eval_steps=2,
        save_strategy="no", report_to="none", disable_tqdm=True, remove_unused_columns=False,
        skip_memory_metrics=skip)
    trainer = xtrainer.Trainer(model=_model(kind), args=args, train_dataset=_rows(), eval_dataset=_rows(8),
                               callbacks=[Allocates()])
    train_metrics = trainer.train().metrics
    Allocates.free_on_evaluate = True
    return trainer, train_metrics, trainer.evaluate(), trainer.predict(_rows(8)).metrics


def _check(tmp_path, kind: str, caplog) -> None:
    rss_before = psutil.Process().memory_info().rss
    with caplog.at_level(logging.WARNING, logger="xtrainer"):
        trainer, train, evaluation, prediction = _run(tmp_path, kind, skip=False)
    # init figures go with the first stage that reports (train), as in transformers
    for key in ("init_mem_cpu_alloc_delta", "init_mem_cpu_peaked_delta", "train_mem_cpu_alloc_delta",
                "train_mem_cpu_peaked_delta", "before_init_mem_cpu"):
        assert isinstance(train[key], int), key
    assert 0.5 * rss_before < train["before_init_mem_cpu"] < 2 * rss_before + 512 * MB
    assert train["train_mem_cpu_alloc_delta"] >= 0.9 * KEPT  # still held when train() ended
    assert train["train_mem_cpu_peaked_delta"] >= 0.9 * PASSING  # came and went
    assert train["train_mem_cpu_peaked_delta"] < train["train_mem_cpu_alloc_delta"] + PASSING + 256 * MB
    logged = [log for log in trainer.state.log_history if "train_loss" in log][0]
    assert logged["train_mem_cpu_alloc_delta"] == train["train_mem_cpu_alloc_delta"]  # in the logged metrics too
    # evaluations inside train() are part of train; the ones after report on their own, without init
    assert not any("eval_mem_cpu_alloc_delta" in log for log in trainer.state.log_history)
    assert {"eval_mem_cpu_alloc_delta", "eval_mem_cpu_peaked_delta"} <= set(evaluation)
    assert {"test_mem_cpu_alloc_delta", "test_mem_cpu_peaked_delta"} <= set(prediction)
    assert "init_mem_cpu_alloc_delta" not in evaluation and "before_init_mem_cpu" not in prediction
    assert evaluation["eval_mem_cpu_alloc_delta"] <= -0.9 * KEPT  # the kept array was freed during evaluate()
    return train, [r.getMessage() for r in caplog.records if "skip_memory_metrics" in r.getMessage()]


def test_memory_metrics_on_torch(tmp_path, caplog):
    train, messages = _check(tmp_path, "torch", caplog)
    assert messages == []  # a CPU torch run has no accelerator to report on, and says nothing about it
    assert not any("_mem_gpu_" in key for key in train)


def test_memory_metrics_on_jax(tmp_path, caplog):
    train, messages = _check(tmp_path, "jax", caplog)
    # JAX's CPU devices keep no memory statistics: said once, CPU figures only
    assert len(messages) == 1 and "backend='jax'" in messages[0] and "JAX cpu device" in messages[0]
    assert not any("_mem_gpu_" in key for key in train)


def test_memory_metrics_on_torch_xla(tmp_path, caplog):
    train, messages = _check(tmp_path, "torch_xla", caplog)
    # the PJRT CPU device does not implement memory statistics: said once, CPU figures only
    assert len(messages) == 1 and "backend='torch_xla'" in messages[0] and "torch_xla device" in messages[0]
    assert not any("_mem_gpu_" in key for key in train)


class _ScriptedProbe:
    """A device probe returning scripted readings, one per read()."""

    description = "a scripted device"

    def __init__(self, readings, resettable_peak):
        self.readings, self.resettable_peak, self.resets = list(readings), resettable_peak, 0

    def read(self):
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]

    def reset_peak(self):
        self.resets += 1

    def settle(self):
        return None


def test_device_figures_with_a_resettable_peak():
    """CUDA's rule (transformers'): the peak counter is reset at the stage start and read at its end."""
    probe = _ScriptedProbe([DeviceReading(100 * MB, 100 * MB), DeviceReading(150 * MB, 400 * MB)], resettable_peak=True)
    tracker = MemoryTracker(skip=False, probe=probe, backend_name="torch")
    tracker.start("eval")
    metrics = {}
    tracker.stop_and_update_metrics("eval", metrics)
    assert probe.resets == 1
    assert metrics["eval_mem_gpu_alloc_delta"] == 50 * MB and metrics["eval_mem_gpu_peaked_delta"] == 250 * MB


@pytest.mark.parametrize("end_peak, expected_peaked", [(900 * MB, 700 * MB), (500 * MB, 0)])
def test_device_figures_with_a_peak_that_cannot_be_reset(end_peak, expected_peaked):
    """JAX / XLA: the runtime's peak counts only if it rose during the stage (else the sampled peak: here the
    readings never exceed the end value)."""
    readings = [DeviceReading(100 * MB, 500 * MB), DeviceReading(200 * MB, end_peak)]
    tracker = MemoryTracker(skip=False, probe=_ScriptedProbe(readings, resettable_peak=False), backend_name="jax")
    tracker.start("train")
    tracker.start("eval")  # nested in train: ignored
    metrics = {}
    tracker.stop_and_update_metrics("eval", metrics)
    assert metrics == {}
    tracker.stop_and_update_metrics("train", metrics)
    assert metrics["train_mem_gpu_alloc_delta"] == 100 * MB
    assert metrics["train_mem_gpu_peaked_delta"] == expected_peaked
