"""The AdamW hyperparameters of TrainingArguments reach the update on every backend.

The probe's loss is the batch mean of x @ w + b, so each step's gradient is known exactly: the mean
of the step's x rows for w, and 1 for b. Three steps of AdamW written out in numpy (decoupled weight
decay on w only, global-norm clipping, a linear schedule with one warmup step, two accumulated
micro-batches per step) must give the backend's weights; each hyperparameter is far enough from its
default that ignoring any one of them moves the weights by 1e-3 or more (the tolerance is 2e-5).
"""

import numpy as np
import pytest

from field_probes import backend_params, make_trainer, probe, probe_weights, rows

HYPER = dict(learning_rate=0.1, adam_beta1=0.6, adam_beta2=0.5, adam_epsilon=0.05, weight_decay=0.2, max_grad_norm=0.5,
             warmup_steps=1, gradient_accumulation_steps=2, max_steps=3, lr_scheduler_type="linear", optim="adamw_torch")
LR_MULTIPLIERS = [0.0, 1.0, 0.5]  # linear schedule over 3 steps with 1 warmup step: 0/1, (3-1)/2, (3-2)/2


def _reference(initial: np.ndarray, step_grads: list[np.ndarray]) -> np.ndarray:
    """AdamW (torch's formulation) on [w0..w3, b] with the given per-step gradients."""
    params = initial.astype(np.float64).copy()
    decays = np.array([1, 1, 1, 1, 0], dtype=np.float64)  # no weight decay on the bias
    m = np.zeros_like(params)
    v = np.zeros_like(params)
    b1, b2, eps = HYPER["adam_beta1"], HYPER["adam_beta2"], HYPER["adam_epsilon"]
    for t, (grad, mult) in enumerate(zip(step_grads, LR_MULTIPLIERS), start=1):
        norm = np.linalg.norm(grad)
        grad = grad * min(HYPER["max_grad_norm"] / (norm + 1e-6), 1.0)
        lr = HYPER["learning_rate"] * mult
        params -= lr * HYPER["weight_decay"] * decays * params
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad**2
        params -= lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return params


@pytest.mark.parametrize("backend", backend_params())
def test_adamw_hyperparameters_reach_the_update(tmp_path, backend):
    data = rows(64, seed=4)
    for i, row in enumerate(data):
        row["x"][0] = np.sin(i)  # keep every feature small (x[0] holds the row index elsewhere)
    model = probe(backend, loss="mean")
    initial = probe_weights(backend, model)
    trainer = make_trainer(backend, tmp_path, model=model, train_dataset=data, **HYPER)
    trainer.train()
    per_step = HYPER["gradient_accumulation_steps"] * trainer.backend.local_batch_devices
    xs = np.stack([r["x"] for r in data]).astype(np.float64)
    grads = [np.append(xs[s * per_step:(s + 1) * per_step].mean(axis=0), 1.0) for s in range(HYPER["max_steps"])]
    expected = _reference(initial, grads)
    np.testing.assert_allclose(probe_weights(backend, trainer.model), expected, rtol=2e-5, atol=2e-6)
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    np.testing.assert_allclose(logged, [HYPER["learning_rate"] * m for m in LR_MULTIPLIERS], rtol=1e-6)
