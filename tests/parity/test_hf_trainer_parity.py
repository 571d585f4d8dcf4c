"""xtrainer's torch backend against transformers' own Trainer: same seed, data and args -> same run."""

import copy

import numpy as np
import pytest
import torch
import transformers

import xtrainer
from helpers import RegressionModel, lm_data, regression_data, tiny_gpt2

COMMON = dict(
    per_device_train_batch_size=4,
    learning_rate=0.05,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    train_sampling_strategy="sequential",
    seed=7,
)


def _run_both(model, dataset, tmp_path, **overrides):
    kwargs = {**COMMON, **overrides}
    hf_model, xt_model = copy.deepcopy(model), copy.deepcopy(model)
    hf = transformers.Trainer(
        model=hf_model, args=transformers.TrainingArguments(str(tmp_path / "hf"), **kwargs), train_dataset=dataset
    )
    hf.train()
    xt = xtrainer.Trainer(
        model=xt_model, args=xtrainer.TrainingArguments(str(tmp_path / "xt"), backend="torch", **kwargs),
        train_dataset=dataset,
    )
    xt.train()
    return hf, xt


def _assert_same_history(hf, xt, atol=1e-6):
    hf_logs = [l for l in hf.state.log_history if "loss" in l]
    xt_logs = [l for l in xt.state.log_history if "loss" in l]
    assert len(hf_logs) == len(xt_logs) > 0
    for a, b in zip(hf_logs, xt_logs):
        assert a["step"] == b["step"]
        assert a["epoch"] == pytest.approx(b["epoch"])
        for key in ("loss", "learning_rate", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=atol), (key, a, b)
    hf_final = [l for l in hf.state.log_history if "train_loss" in l][0]
    xt_final = [l for l in xt.state.log_history if "train_loss" in l][0]
    assert xt_final["train_loss"] == pytest.approx(hf_final["train_loss"], rel=1e-6)


def _assert_same_weights(hf_model, xt_model, atol=1e-6):
    hf_state, xt_state = hf_model.state_dict(), xt_model.state_dict()
    assert hf_state.keys() == xt_state.keys()
    for name in hf_state:
        torch.testing.assert_close(xt_state[name], hf_state[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_train_epochs=2, max_grad_norm=1.0),
        dict(max_steps=7, gradient_accumulation_steps=3, lr_scheduler_type="cosine", warmup_steps=2),
        dict(num_train_epochs=1.5, weight_decay=0.1, optim="adamw_torch", max_grad_norm=0.0),
        dict(max_steps=5, optim="sgd", lr_scheduler_type="constant_with_warmup", warmup_steps=0.4),
    ],
)
def test_regression_model_matches_hf(tmp_path, overrides):
    hf, xt = _run_both(RegressionModel(), regression_data(36), tmp_path, **overrides)
    _assert_same_history(hf, xt)
    _assert_same_weights(hf.model, xt.model)
    assert xt.state.global_step == hf.state.global_step


@pytest.mark.parametrize("ga", [1, 2])
def test_tiny_gpt2_matches_hf(tmp_path, ga):
    # Labels with a masked tail make token counts differ per micro-batch: this checks HF's
    # num_items_in_batch normalisation under gradient accumulation.
    hf, xt = _run_both(
        tiny_gpt2(), lm_data(24), tmp_path, max_steps=6, gradient_accumulation_steps=ga, learning_rate=1e-3,
        per_device_train_batch_size=2, lr_scheduler_type="linear", warmup_steps=2,
    )
    _assert_same_history(hf, xt)
    _assert_same_weights(hf.model, xt.model)


def test_evaluate_and_predict_match_hf(tmp_path):
    model, data = RegressionModel(a=1.0, b=0.5, double_output=True), regression_data(21)
    kwargs = dict(per_device_eval_batch_size=4, report_to="none", disable_tqdm=True)
    metric_calls = {}

    def compute_metrics(pred):
        metric_calls.setdefault("shapes", []).append(np.shape(pred.predictions[0]))
        return {"mae": float(np.abs(pred.predictions[0] - pred.label_ids).mean())}

    hf = transformers.Trainer(model=copy.deepcopy(model), args=transformers.TrainingArguments(str(tmp_path / "h"), **kwargs),
                              eval_dataset=data, compute_metrics=compute_metrics)
    xt = xtrainer.Trainer(model=copy.deepcopy(model), args=xtrainer.TrainingArguments(str(tmp_path / "x"), **kwargs),
                          eval_dataset=data, compute_metrics=compute_metrics)
    hm, xm = hf.evaluate(), xt.evaluate()
    assert xm["eval_loss"] == pytest.approx(hm["eval_loss"], rel=1e-6)
    assert xm["eval_mae"] == pytest.approx(hm["eval_mae"], rel=1e-6)
    hp, xp = hf.predict(data), xt.predict(data)
    np.testing.assert_allclose(xp.predictions[0], hp.predictions[0], rtol=1e-6)
    np.testing.assert_allclose(xp.label_ids, hp.label_ids)
    assert xp.metrics["test_loss"] == pytest.approx(hp.metrics["test_loss"], rel=1e-6)


def test_label_smoothing_matches_hf(tmp_path):
    hf, xt = _run_both(
        tiny_gpt2(), lm_data(16), tmp_path, max_steps=4, gradient_accumulation_steps=2, learning_rate=1e-3,
        per_device_train_batch_size=2, label_smoothing_factor=0.1,
    )
    _assert_same_history(hf, xt)
    _assert_same_weights(hf.model, xt.model)
