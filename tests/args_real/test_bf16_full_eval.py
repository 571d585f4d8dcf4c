"""bf16_full_eval: an evaluate()/predict() outside train() runs the model in bfloat16 (transformers casts the
model in place), an evaluation during train() keeps the training precision; on torch, torch_xla and jax."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import full_eval_cases as cases  # noqa: E402

DTYPE = torch.bfloat16


def test_torch_matches_transformers(tmp_path):
    cases.torch_matches_transformers(tmp_path, DTYPE)


def test_torch_evaluation_during_training_keeps_float32(tmp_path):
    cases.torch_train_time_evaluation_keeps_training_precision(tmp_path, DTYPE)


def test_jax_reference_model_evaluates_with_half_precision_weights(tmp_path):
    cases.jax_reference_model_evaluates_with_half_precision_weights(tmp_path, DTYPE)


def test_jax_evaluation_during_training_keeps_training_precision(tmp_path):
    cases.jax_train_time_evaluation_keeps_training_precision(tmp_path, DTYPE)


def test_torchax_evaluates_in_half_precision(tmp_path):
    cases.torchax_evaluates_in_half_precision(tmp_path, DTYPE)


def test_torch_xla_evaluates_in_half_precision(tmp_path):
    cases.torch_xla_evaluates_in_half_precision(tmp_path, DTYPE)
