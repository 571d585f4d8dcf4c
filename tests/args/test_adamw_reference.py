"""The AdamW hyperparameters reach the update exactly, on every backend: three steps against AdamW written out
in numpy.

The probe's loss is the batch mean of x @ w + b, so each step's gradient is known: the mean of the step's x rows
for w, and 1 for b. The reference applies torch's AdamW formulation with decoupled weight decay on w only (biases
are not decayed, as in transformers), global-norm clipping, a linear schedule with one warmup step and two
accumulated micro-batches per step. Each hyperparameter is far enough from its default that ignoring any one of
them moves the weights by 1e-3 or more (the tolerance is 2e-5). tests/args/test_front_fields.py::
test_optimizer_fields checks that each field changes the weights; this checks that it changes them correctly.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import xtrainer

HYPER = dict(learning_rate=0.1, adam_beta1=0.6, adam_beta2=0.5, adam_epsilon=0.05, weight_decay=0.2, max_grad_norm=0.5,
             warmup_steps=1, gradient_accumulation_steps=2, max_steps=3, lr_scheduler_type="linear", optim="adamw_torch")
LR_MULTIPLIERS = [0.0, 1.0, 0.5]  # linear schedule over 3 steps with 1 warmup step: 0/1, (3-1)/2, (3-2)/2
INITIAL_W, INITIAL_B = (0.5, -0.5, 1.0, 2.0), 0.1


def _torch_probe():
    import torch
    from torch import nn

    class MeanProbe(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 1)
            with torch.no_grad():
                self.linear.weight.copy_(torch.tensor([INITIAL_W]))
                self.linear.bias.fill_(INITIAL_B)

        def forward(self, x, labels=None):
            y = self.linear(x)[..., 0]
            return (y.mean(), y)

    return MeanProbe()


def _jax_probe():
    import jax.numpy as jnp
    from flax import nnx

    class MeanProbe(nnx.Module):
        def __init__(self):
            self.linear = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
            self.linear.kernel.value = jnp.asarray(INITIAL_W, jnp.float32).reshape(4, 1)
            self.linear.bias.value = jnp.full((1,), INITIAL_B, jnp.float32)

        def __call__(self, x, labels=None):
            y = self.linear(x)[..., 0]
            return {"loss": jnp.mean(y), "logits": y}

    return MeanProbe()


def _weights(kind: str, model) -> np.ndarray:
    """[w0, w1, w2, w3, b]."""
    if kind == "jax":
        return np.concatenate([np.asarray(model.linear.kernel.value).reshape(-1), np.asarray(model.linear.bias.value)])
    return np.concatenate([model.linear.weight.detach().cpu().numpy().reshape(-1),
                           model.linear.bias.detach().cpu().numpy()])


def _reference(initial: np.ndarray, step_grads: list[np.ndarray]) -> np.ndarray:
    params = initial.astype(np.float64).copy()
    decays = np.array([1, 1, 1, 1, 0], dtype=np.float64)  # no weight decay on the bias
    m, v = np.zeros_like(params), np.zeros_like(params)
    b1, b2, eps = HYPER["adam_beta1"], HYPER["adam_beta2"], HYPER["adam_epsilon"]
    for t, (grad, mult) in enumerate(zip(step_grads, LR_MULTIPLIERS), start=1):
        grad = grad * min(HYPER["max_grad_norm"] / (np.linalg.norm(grad) + 1e-6), 1.0)
        lr = HYPER["learning_rate"] * mult
        params -= lr * HYPER["weight_decay"] * decays * params
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad**2
        params -= lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return params


@pytest.mark.parametrize("kind", ["torch", "jax", "torch_xla"])
def test_adamw_hyperparameters_reach_the_update(tmp_path, kind):
    if importlib.util.find_spec({"torch": "torch", "jax": "flax", "torch_xla": "torch_xla"}[kind]) is None:
        pytest.skip(f"{kind} runs in the other lane")
    rng = np.random.default_rng(4)
    data = [{"x": np.append(np.sin(i), rng.normal(size=3)).astype(np.float32), "labels": np.float32(0)}
            for i in range(64)]
    model = _jax_probe() if kind == "jax" else _torch_probe()
    initial = _weights(kind, model)
    args = xtrainer.TrainingArguments(str(tmp_path), backend=kind, report_to="none", disable_tqdm=True,
                                      save_strategy="no", logging_steps=1, train_sampling_strategy="sequential",
                                      per_device_train_batch_size=1, **HYPER)
    trainer = xtrainer.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    per_step = HYPER["gradient_accumulation_steps"] * trainer.backend.local_batch_devices
    xs = np.stack([r["x"] for r in data]).astype(np.float64)
    grads = [np.append(xs[s * per_step:(s + 1) * per_step].mean(axis=0), 1.0) for s in range(HYPER["max_steps"])]
    np.testing.assert_allclose(_weights(kind, trainer.model), _reference(initial, grads), rtol=2e-5, atol=2e-6)
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    np.testing.assert_allclose(logged, [HYPER["learning_rate"] * m for m in LR_MULTIPLIERS], rtol=1e-6)
