"""skip_memory_metrics=False adds transformers' `*_mem_*` metrics to init, train, eval and predict results."""

from __future__ import annotations

import importlib.util

import pytest

import xtrainer
from helpers import RegressionModel, regression_data


def _model(kind):
    if kind == "jax":
        pytest.importorskip("flax")
        from flax import nnx

        from jax_models import RegressionMLP, regression_rows

        return RegressionMLP(nnx.Rngs(0)), regression_rows(32)
    if kind == "torch_xla" and importlib.util.find_spec("torch_xla") is None:
        pytest.skip("torch_xla runs in the XLA lane")
    return RegressionModel(), regression_data(32)


@pytest.mark.parametrize("kind", ["torch", "jax", "torch_xla"])
def test_memory_metrics_per_stage(tmp_path, kind):
    model, data = _model(kind)
    per_device = 4 if kind == "torch" else 1
    args = xtrainer.TrainingArguments(str(tmp_path), backend=kind, skip_memory_metrics=False, max_steps=2,
                                      per_device_train_batch_size=per_device, per_device_eval_batch_size=per_device,
                                      report_to="none", disable_tqdm=True, save_strategy="no")
    trainer = xtrainer.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8])
    train = trainer.train().metrics
    for stage in ("init", "train"):  # init's figures come with the first stage that reports
        assert isinstance(train[f"{stage}_mem_cpu_alloc_delta"], int)
        assert train[f"{stage}_mem_cpu_peaked_delta"] >= 0
    evaluation = trainer.evaluate()
    assert "eval_mem_cpu_alloc_delta" in evaluation and "init_mem_cpu_alloc_delta" not in evaluation
    assert "test_mem_cpu_alloc_delta" in trainer.predict(data[:8]).metrics
    quiet = xtrainer.Trainer(model=_model(kind)[0], train_dataset=data, eval_dataset=data[:8],
                             args=xtrainer.TrainingArguments(str(tmp_path / "q"), backend=kind, max_steps=1,
                                                             per_device_train_batch_size=per_device,
                                                             per_device_eval_batch_size=per_device, report_to="none"))
    assert not [k for k in quiet.train().metrics if "_mem_" in k]  # the default skips them, as transformers does
