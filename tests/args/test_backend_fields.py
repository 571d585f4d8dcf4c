"""TrainingArguments fields that act inside one backend (precision, compilation, DDP, debugging, ...).

Each test fails if its field were ignored on the backend named in its parameters; xtrainer/args_support.py
points at these tests for the fields it marks "acts" on that backend.
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest
import torch

import xtrainer
from helpers import RegressionModel, lm_data, regression_data, tiny_gpt2


def _needs(kind: str) -> None:
    if kind == "torch_xla" and importlib.util.find_spec("torch_xla") is None:
        pytest.skip("torch_xla runs in the XLA lane")
    if kind == "torchax":
        try:
            import torchax  # noqa: F401
        except Exception:
            pytest.skip("torchax runs in the XLA lane")


def _args(tmp_path, kind: str, **kw):
    backend = "jax" if kind == "torchax" else kind
    base = dict(backend=backend, per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=3,
                logging_steps=1, learning_rate=1e-2, save_strategy="no", report_to="none", disable_tqdm=True,
                train_sampling_strategy="sequential", seed=0)
    if backend == "jax":
        base["per_device_train_batch_size"] = base["per_device_eval_batch_size"] = 1
    base.update(kw)
    return xtrainer.TrainingArguments(str(tmp_path), **base)


def _losses(trainer) -> list[float]:
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("kind", ["torch", "torch_xla"])
def test_label_smoothing(tmp_path, kind):
    _needs(kind)
    runs = {}
    for eps in (0.0, 0.2):
        trainer = xtrainer.Trainer(model=tiny_gpt2(), args=_args(tmp_path / str(eps), kind, label_smoothing_factor=eps),
                                   train_dataset=lm_data(16))
        trainer.train()
        runs[eps] = _losses(trainer)
    assert abs(runs[0.2][0] - runs[0.0][0]) > 1e-4  # the first step's loss already differs


def test_tf32(tmp_path, monkeypatch):
    from xtrainer.backends.torch.backend import apply_tf32

    with pytest.raises(ValueError, match="tf32=True needs an Ampere"):
        xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path, "torch", tf32=True))
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        apply_tf32(True, torch.device("cuda", 0))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        apply_tf32(False, torch.device("cuda", 0))
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_activation_checkpointing_on_torch_xla(tmp_path):
    _needs("torch_xla")
    model = tiny_gpt2()
    xtrainer.Trainer(model=model, args=_args(tmp_path, "torch_xla", activation_checkpointing=True))
    assert model.is_gradient_checkpointing


@pytest.mark.parametrize("kind", ["torch", "torch_xla"])
def test_activation_checkpointing_kwargs_reach_the_model(tmp_path, kind, monkeypatch):
    _needs(kind)
    model = tiny_gpt2()
    seen = {}
    original = model.gradient_checkpointing_enable
    monkeypatch.setattr(model, "gradient_checkpointing_enable",
                        lambda gradient_checkpointing_kwargs=None: seen.update(gradient_checkpointing_kwargs or {})
                        or original(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs))
    xtrainer.Trainer(model=model, args=_args(tmp_path, kind, activation_checkpointing=True,
                                             activation_checkpointing_kwargs={"use_reentrant": False}))
    assert seen == {"use_reentrant": False}


def test_torch_compile_options_reach_torch_compile(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: calls.append(kw) or module)
    trainer = xtrainer.Trainer(model=RegressionModel(), train_dataset=regression_data(8),
                               args=_args(tmp_path, "torch", torch_compile_backend="eager", torch_compile_mode="default"))
    trainer.train()
    assert calls == [{"backend": "eager", "mode": "default"}]


def test_full_determinism_on_torch(tmp_path):
    try:
        xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path, "torch", full_determinism=True))
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


@pytest.mark.parametrize("kind", ["torch", "torchax", "torch_xla"])
def test_use_cache_sets_the_model_config(tmp_path, kind):
    _needs(kind)
    model = tiny_gpt2()
    assert model.config.use_cache
    xtrainer.Trainer(model=model, args=_args(tmp_path, kind))
    assert model.config.use_cache is False  # transformers' default for training
    xtrainer.Trainer(model=model, args=_args(tmp_path, kind, use_cache=True))
    assert model.config.use_cache is True


def test_debug_underflow_overflow(tmp_path, capsys):
    rows = regression_data(8)
    rows[0]["input_x"] = 1e38  # overflows to inf in the forward pass
    trainer = xtrainer.Trainer(model=RegressionModel(a=10.0), train_dataset=rows,
                               args=_args(tmp_path, "torch", debug="underflow_overflow", max_steps=1))
    with pytest.raises(ValueError, match="inf/nan"):
        trainer.train()


def test_debug_tpu_metrics_on_torch_xla(tmp_path, capsys):
    _needs("torch_xla")
    trainer = xtrainer.Trainer(model=RegressionModel(), eval_dataset=regression_data(8),
                               args=_args(tmp_path, "torch_xla", debug="tpu_metrics_debug"))
    trainer.evaluate()
    assert "Metric: CompileTime" in capsys.readouterr().out


def test_local_rank_names_the_process(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert _args(tmp_path, "torch", local_rank=3).local_process_index == 3
    assert _args(tmp_path, "torch").local_process_index == 0


def test_ddp_fields_reach_ddp(tmp_path, monkeypatch):
    from xtrainer.backends.torch import distributed

    args = _args(tmp_path, "torch", ddp_bucket_cap_mb=7, ddp_broadcast_buffers=False, ddp_static_graph=True,
                 ddp_find_unused_parameters=False, ddp_timeout=42, ddp_backend="gloo")
    assert distributed.ddp_kwargs(RegressionModel(), args) == {
        "find_unused_parameters": False, "bucket_cap_mb": 7, "broadcast_buffers": False, "static_graph": True}
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    distributed.init_from_env(args)
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() == 42


def test_fsdp_config_layer_classes(tmp_path):
    from xtrainer.backends.torch import fsdp

    model = tiny_gpt2()
    args = _args(tmp_path, "torch", fsdp="full_shard", fsdp_config={"transformer_layer_cls_to_wrap": ["GPT2Block"]})
    blocks = fsdp.wrap_units(model, fsdp.options(args))
    assert len(blocks) == model.config.n_layer and all(type(b).__name__ == "GPT2Block" for b in blocks)
    none = _args(tmp_path, "torch", fsdp="full_shard", fsdp_config={"transformer_layer_cls_to_wrap": ["GPT2MLP"]})
    mlps = fsdp.wrap_units(model, fsdp.options(none))
    assert len(mlps) == model.config.n_layer and all(type(b).__name__ == "GPT2MLP" for b in mlps)


def test_sharding_rules_on_torch_xla(tmp_path):
    _needs("torch_xla")
    trainer = xtrainer.Trainer(model=tiny_gpt2(), args=_args(tmp_path, "torch_xla", mesh={"data": 2, "fsdp": 2},
                                                            sharding_rules=[["wte", ["fsdp", None]]]))
    specs = trainer.backend.param_specs
    assert tuple(specs["transformer.wte.weight"]) == ("fsdp", None)
