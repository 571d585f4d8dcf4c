"""Torch backend features: precision, compile, gradient checkpointing, optimizers, device choice."""

import copy

import pytest
import torch

import xtrainer
from helpers import RegressionModel, lm_data, regression_data, tiny_gpt2
from xtrainer.backends.torch.backend import TorchBackend
from xtrainer.backends.torch.optim import decay_parameter_names

BASE = dict(per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            train_sampling_strategy="sequential")


def _train(model, data, tmp_path, **kw):
    trainer = xtrainer.Trainer(model=model, args=xtrainer.TrainingArguments(str(tmp_path), **{**BASE, **kw}),
                               train_dataset=data)
    trainer.train()
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_fp32_master_weights(tmp_path, precision):
    trainer, losses = _train(tiny_gpt2(), lm_data(16), tmp_path, max_steps=8, learning_rate=3e-3, **{precision: True})
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert losses[-1] < losses[0]
    state = trainer._backend_state
    assert (state.scaler is not None) == (precision == "fp16")  # fp16 scales the loss, bf16 needs no scaler


def test_fp16_checkpoint_has_scaler_state(tmp_path):
    _train(RegressionModel(), regression_data(16), tmp_path, max_steps=2, fp16=True, save_strategy="steps", save_steps=2)
    assert (tmp_path / "checkpoint-2" / "scaler.pt").is_file()


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    base = tiny_gpt2()
    _, plain = _train(copy.deepcopy(base), lm_data(16), tmp_path / "a", max_steps=4, learning_rate=1e-3)
    trainer, ckpt = _train(copy.deepcopy(base), lm_data(16), tmp_path / "b", max_steps=4, learning_rate=1e-3,
                           activation_checkpointing=True)
    assert trainer.model.is_gradient_checkpointing
    assert ckpt == pytest.approx(plain, rel=1e-5)


def test_gradient_checkpointing_needs_a_capable_model(tmp_path):
    with pytest.warns(DeprecationWarning, match="gradient_checkpointing"):  # the v4 name still works
        args = xtrainer.TrainingArguments(str(tmp_path), gradient_checkpointing=True)
    with pytest.raises(ValueError, match="activation_checkpointing=True .gradient_checkpointing. needs a model"):
        xtrainer.Trainer(model=RegressionModel(), args=args)


def test_torch_compile_matches_eager(tmp_path):
    data = regression_data(16)
    _, eager = _train(RegressionModel(), data, tmp_path / "e", max_steps=3, learning_rate=0.05)
    _, compiled = _train(RegressionModel(), data, tmp_path / "c", max_steps=3, learning_rate=0.05,
                         torch_compile=True, torch_compile_backend="aot_eager")
    assert compiled == pytest.approx(eager, rel=1e-5)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused", "sgd", "adafactor", "adagrad", "rmsprop", "lion_32bit"])
def test_every_optimizer_reduces_the_loss(tmp_path, optim):
    lr = {"adafactor": 0.05, "lion_32bit": 0.02}.get(optim, 0.05)
    _, losses = _train(RegressionModel(), regression_data(32), tmp_path, max_steps=16, learning_rate=lr, optim=optim,
                       lr_scheduler_type="constant")
    assert losses[-1] < losses[0]


def test_weight_decay_skips_biases_and_norms(tmp_path):
    model = tiny_gpt2()
    decayed = set(decay_parameter_names(model))
    assert "transformer.h.0.attn.c_attn.weight" in decayed
    assert not any("bias" in n or ".ln_" in n for n in decayed)
    trainer, _ = _train(model, lm_data(8), tmp_path, max_steps=1, weight_decay=0.1)
    groups = trainer._backend_state.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(("bias" in names[id(p)] or ".ln_" in names[id(p)]) for p in groups[1]["params"])


def test_device_is_chosen_automatically(monkeypatch):
    args = xtrainer.TrainingArguments("unused")
    backend = TorchBackend()
    backend.dist = type("D", (), {"local_rank": 1})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend._pick_device(args) == torch.device("cuda", 1)
    assert backend._pick_device(xtrainer.TrainingArguments("unused", use_cpu=True)).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend._pick_device(args).type == "cpu"
