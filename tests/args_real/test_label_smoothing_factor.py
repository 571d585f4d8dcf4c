"""label_smoothing_factor on the JAX backend: the same smoothed loss as the torch backend (and transformers'
LabelSmoother), for the reference Flax models and for torch models through torchax."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402

import xtrainer  # noqa: E402
from helpers import lm_data  # noqa: E402
from xtrainer.backends.jax.losses import label_smoothed_loss  # noqa: E402
from xtrainer.backends.torch.backend import label_smoothed_loss as torch_label_smoothed_loss  # noqa: E402

EPSILON = 0.2
STEPS = 3


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("num_items", [None, 37.0])
def test_jax_loss_equals_torch_backend_and_transformers(shift, num_items):
    from transformers.trainer_pt_utils import LabelSmoother

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
    labels = rng.integers(0, 11, size=(3, 7))
    labels[:, -2:] = -100
    labels[1, 0] = -100
    got = float(label_smoothed_loss(jnp.asarray(logits), jnp.asarray(labels), EPSILON, num_items, shift=shift))
    items = None if num_items is None else torch.tensor(num_items)
    torch_args = (torch.from_numpy(logits), torch.from_numpy(labels))
    expected = float(torch_label_smoothed_loss(*torch_args, EPSILON, items, shift=shift))
    hf = float(LabelSmoother(epsilon=EPSILON)({"logits": torch_args[0]}, torch_args[1], shift_labels=shift,
                                              num_items_in_batch=items))
    assert got == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(hf, rel=1e-6)
    unsmoothed = float(label_smoothed_loss(jnp.asarray(logits), jnp.asarray(labels), 0.0, num_items, shift=shift))
    assert abs(got - unsmoothed) > 1e-3


def _hf_llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                      attn_implementation="eager", initializer_range=0.5)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _args(path, backend, per_device, smoothing):
    return xtrainer.TrainingArguments(
        str(path), backend=backend, per_device_train_batch_size=per_device, per_device_eval_batch_size=per_device,
        max_steps=STEPS, logging_steps=1, learning_rate=1e-2, gradient_accumulation_steps=2, save_strategy="no",
        report_to="none", disable_tqdm=True, train_sampling_strategy="sequential",
        label_smoothing_factor=smoothing,
    )


def _run(model, path, backend, per_device, smoothing, data):
    trainer = xtrainer.Trainer(model=model, args=_args(path, backend, per_device, smoothing), train_dataset=data,
                               eval_dataset=data[:8])
    eval_loss = trainer.evaluate()["eval_loss"]
    trainer.train()
    return eval_loss, np.array([h["loss"] for h in trainer.state.log_history if "loss" in h])


def test_jax_reference_llama_matches_torch_backend(tmp_path):
    """Flax Llama on jax and transformers' Llama on torch, same weights and data: same smoothed losses
    (evaluation and a gradient-accumulated training curve, with label counts differing per micro-batch)."""
    from xtrainer.models import load_hf_llama

    hf = _hf_llama()
    data = lm_data(24, seq=12, vocab=64)
    # Global batch 8 on both: 8 fake JAX devices x 1, one torch process x 8.
    torch_eval, torch_curve = _run(copy.deepcopy(hf), tmp_path / "t", "torch", 8, EPSILON, data)
    jax_eval, jax_curve = _run(load_hf_llama(hf.state_dict(), hf.config), tmp_path / "j", "jax", 1, EPSILON, data)
    plain_eval, plain_curve = _run(copy.deepcopy(hf), tmp_path / "p", "torch", 8, 0.0, data)
    assert jax_eval == pytest.approx(torch_eval, abs=1e-4)
    np.testing.assert_allclose(jax_curve, torch_curve, atol=1e-4, rtol=0)
    # Ignoring the field would give the plain cross entropy: the smoothing term is far larger than the tolerance.
    assert abs(jax_eval - plain_eval) > 0.01, (jax_eval, plain_eval)
    assert np.all(np.abs(jax_curve - plain_curve) > 1e-3), (jax_curve, plain_curve)


def _gpt2():
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.5)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def test_torchax_gpt2_matches_torch_backend(tmp_path):
    """A transformers model through torchax (XLA lane): the smoothed loss equals the torch backend's."""
    pytest.importorskip("torchax")
    base = _gpt2()
    data = lm_data(24, seq=12, vocab=64)
    torch_eval, torch_curve = _run(copy.deepcopy(base), tmp_path / "t", "torch", 8, EPSILON, data)
    jax_eval, jax_curve = _run(copy.deepcopy(base), tmp_path / "j", "jax", 1, EPSILON, data)
    plain_eval, _ = _run(copy.deepcopy(base), tmp_path / "p", "torch", 8, 0.0, data)
    assert jax_eval == pytest.approx(torch_eval, abs=1e-4)
    np.testing.assert_allclose(jax_curve, torch_curve, atol=1e-4, rtol=0)
    assert abs(jax_eval - plain_eval) > 0.01, (jax_eval, plain_eval)
