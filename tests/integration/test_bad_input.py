"""Bad input gets an error that names the problem, and nothing already written is lost.

The bad-input matrix (arguments, data, output_dir, checkpoints, on torch and jax) is in
test_bad_input_matrix.py; these are the remaining model/loop cases.
"""

import importlib.util
import os

import pytest
import torch
from torch import nn

import xtrainer
from helpers import RegressionModel, regression_data

ARGS = dict(per_device_train_batch_size=4, report_to="none", disable_tqdm=True, logging_steps=1)


class NoLossModel(nn.Module):
    """Returns predictions only: it needs labels from somewhere else to be trainable."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, input_x):
        return {"logits": input_x * self.w}


def _trainer(tmp_path, model=None, data=None, **kw):
    return xtrainer.Trainer(model=model or RegressionModel(), args=xtrainer.TrainingArguments(str(tmp_path), **{**ARGS, **kw}),
                            train_dataset=regression_data(16) if data is None else data)


def test_model_without_loss_and_without_labels(tmp_path):
    data = [{"input_x": 1.0}] * 8
    with pytest.raises(ValueError, match="did not return a loss.*labels"):
        _trainer(tmp_path, NoLossModel(), data, max_steps=1).train()


def test_missing_label_column(tmp_path):
    data = [{"input_x": float(i)} for i in range(8)]  # RegressionModel only returns a loss given labels
    with pytest.raises(ValueError, match="returned a tensor of shape|did not return a loss"):
        _trainer(tmp_path, data=data, max_steps=1).train()


def test_no_train_dataset(tmp_path):
    trainer = xtrainer.Trainer(model=RegressionModel(), args=xtrainer.TrainingArguments(str(tmp_path), **ARGS))
    with pytest.raises(ValueError, match="needs a train_dataset"):
        trainer.train()
    with pytest.raises(ValueError, match="needs an eval_dataset"):
        trainer.evaluate()


def test_unknown_backend_and_model_kind(tmp_path):
    with pytest.raises(ValueError, match="backend='tpu' is unknown"):
        xtrainer.backends.resolve_backend_name("tpu", RegressionModel())
    if importlib.util.find_spec("torch_xla") is None:  # main lane
        with pytest.raises(ValueError, match=r"backend='torch_xla' needs torch_xla.*pip install 'xtrainer\[xla\]'"):
            xtrainer.Trainer(model=RegressionModel(), args=xtrainer.TrainingArguments(str(tmp_path), backend="torch_xla"))
    with pytest.raises(TypeError, match="backend='jax' takes a flax.nnx.Module"):
        xtrainer.Trainer(model=object(), args=xtrainer.TrainingArguments(str(tmp_path), backend="jax"))


@pytest.mark.skipif(importlib.util.find_spec("torchax") is not None, reason="torchax is installed in this lane")
def test_torch_model_on_jax_without_torchax_names_versions_and_fix(tmp_path):
    with pytest.raises(ImportError, match=r"needs torchax.*torch 2\.\d+.*pip install 'xtrainer\[xla\]'"):
        xtrainer.Trainer(model=RegressionModel(), args=xtrainer.TrainingArguments(str(tmp_path), backend="jax"))
    with pytest.raises(ValueError, match="found no backend for a object"):
        xtrainer.Trainer(model=object(), args=xtrainer.TrainingArguments(str(tmp_path)))
    with pytest.raises(ValueError, match="needs either a `model` or a `model_init`"):
        xtrainer.Trainer(args=xtrainer.TrainingArguments(str(tmp_path)))


def test_failure_mid_training_keeps_history_and_checkpoints(tmp_path):
    calls = {"n": 0}

    def loss_that_breaks(outputs, labels, num_items_in_batch=None):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("user loss failed at step 6")
        return nn.functional.mse_loss(outputs[0], labels)

    trainer = xtrainer.Trainer(
        model=RegressionModel(), train_dataset=regression_data(32), compute_loss_func=loss_that_breaks,
        args=xtrainer.TrainingArguments(str(tmp_path), **ARGS, max_steps=8, save_steps=2),
    )
    with pytest.raises(RuntimeError, match="step 6"):
        trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3, 4, 5]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4"]
    assert len(trainer.state.log_history) == 5
