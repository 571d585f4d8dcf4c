"""torch_empty_cache_steps on the torch backend: the accelerator cache is emptied after the forward pass of
every micro-batch while the finished optimizer steps are a multiple of N (transformers' schedule). On CPU the
cache-empty function is mocked; the run says once that the field does nothing there."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")

import xtrainer  # noqa: E402
from helpers import RegressionModel, regression_data  # noqa: E402
from xtrainer.backends.torch import device_cache  # noqa: E402


def _train(tmp_path, every, steps=5, ga=2, resume=None):
    args = xtrainer.TrainingArguments(
        str(tmp_path), backend="torch", use_cpu=True, per_device_train_batch_size=4, gradient_accumulation_steps=ga,
        max_steps=steps, save_steps=2, report_to="none", disable_tqdm=True, torch_empty_cache_steps=every,
    )
    trainer = xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=regression_data(64))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture
def emptied(monkeypatch):
    """Records the optimizer steps already finished at each (mocked) cache-empty call."""
    calls = []
    real_after_forward = device_cache.CacheEmptier.after_forward

    def clear(device):
        calls.append(("clear", device.type))

    def after_forward(self):
        before = len(calls)
        real_after_forward(self)
        if len(calls) > before:
            calls[-1] = ("clear", self.steps_done)

    monkeypatch.setattr(device_cache, "clear_device_cache", clear)
    monkeypatch.setattr(device_cache.CacheEmptier, "after_forward", after_forward)
    return calls


def test_cache_is_emptied_every_n_steps_for_each_micro_batch(tmp_path, emptied, caplog):
    with caplog.at_level(logging.WARNING, logger="xtrainer.backends.torch.device_cache"):
        _train(tmp_path, every=2)
    # Steps 0, 2 and 4 (finished steps before the window), each with its 2 micro-batches.
    assert emptied == [("clear", 0)] * 2 + [("clear", 2)] * 2 + [("clear", 4)] * 2
    warnings = [r.getMessage() for r in caplog.records if "torch_empty_cache_steps" in r.getMessage()]
    assert len(warnings) == 1 and "does nothing on CPU" in warnings[0]


def test_unset_never_empties(tmp_path, emptied, caplog):
    with caplog.at_level(logging.WARNING, logger="xtrainer.backends.torch.device_cache"):
        _train(tmp_path, every=None)
    assert emptied == []
    assert not [r for r in caplog.records if "torch_empty_cache_steps" in r.getMessage()]


def test_resume_continues_the_step_count(tmp_path, emptied):
    _train(tmp_path, every=3, steps=2, ga=1)
    emptied.clear()
    _train(tmp_path, every=3, steps=5, ga=1, resume=str(tmp_path / "checkpoint-2"))
    assert emptied == [("clear", 3)]  # steps 2..4 run; only step 3 is a multiple of 3


@pytest.mark.parametrize("kind,attr", [("cuda", "cuda"), ("mps", "mps")])
def test_clear_device_cache_calls_the_device_allocator(monkeypatch, kind, attr):
    called = []
    module = getattr(torch, attr)
    monkeypatch.setattr(module, "empty_cache", lambda: called.append(kind))
    device_cache.clear_device_cache(torch.device(kind))
    device_cache.clear_device_cache(torch.device("cpu"))
    assert called == [kind]
