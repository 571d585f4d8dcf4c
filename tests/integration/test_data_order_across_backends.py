"""Equal seeds and args give the same data order on every backend (the sampler lives in the front)."""

import numpy as np
import pytest

import xtrainer
from helpers import RegressionModel

ROWS = [{"x": np.full(4, i, np.float32), "labels": float(i)} for i in range(40)]


def _order(trainer, epoch):
    return [b["labels"].tolist() for b in trainer.get_train_dataloader().epoch(epoch)]


def _trainer(model, backend, tmp_path, **kw):
    args = xtrainer.TrainingArguments(str(tmp_path), backend=backend, report_to="none", remove_unused_columns=False,
                                      train_sampling_strategy="random", **kw)
    return xtrainer.Trainer(model=model, args=args, train_dataset=ROWS)


def test_random_order_is_equal_on_torch_and_jax(tmp_path):
    nnx = pytest.importorskip("flax.nnx")
    from jax_models import RegressionMLP

    # Global batch 8 on both: torch per-device 8; JAX per-device 1 on the 8 fake devices.
    torch_trainer = _trainer(RegressionModel(), "torch", tmp_path / "t", per_device_train_batch_size=8, seed=5)
    jax_trainer = _trainer(RegressionMLP(nnx.Rngs(0)), "jax", tmp_path / "j", per_device_train_batch_size=1, seed=5)
    for epoch in (0, 1):
        assert _order(torch_trainer, epoch) == _order(jax_trainer, epoch)
    assert _order(torch_trainer, 0) != _order(torch_trainer, 1)  # a new permutation each epoch
    flat = sorted(v for batch in _order(torch_trainer, 0) for v in batch)
    assert flat == [float(i) for i in range(40)]


def test_data_seed_overrides_seed(tmp_path):
    a = _trainer(RegressionModel(), "torch", tmp_path / "a", per_device_train_batch_size=8, seed=1, data_seed=9)
    b = _trainer(RegressionModel(), "torch", tmp_path / "b", per_device_train_batch_size=8, seed=2, data_seed=9)
    c = _trainer(RegressionModel(), "torch", tmp_path / "c", per_device_train_batch_size=8, seed=1)
    assert _order(a, 0) == _order(b, 0) != _order(c, 0)
