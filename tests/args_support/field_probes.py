"""Shared pieces of the per-backend TrainingArguments tests: tiny probe models, data and a trainer builder.

The same linear probe exists as a torch module (torch and torch_xla backends) and a Flax NNX module
(jax backend): y = x @ w + b, the loss is the MSE to `labels` (or to `target`), and every forward
records the dtype of its matmul output in `PROBE_DTYPES` (jax records it while tracing). Rows carry
their index in x[0], so a recording collator sees the order in which the loader handed them out.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

BACKENDS = ("jax", "torch", "torch_xla")
PROBE_DTYPES: list = []


def backend_params():
    """pytest params for the three backends, skipped where the backend's stack is not installed."""
    needs = {"jax": "flax", "torch": "torch", "torch_xla": "torch_xla"}
    return [pytest.param(b, id=b, marks=pytest.mark.skipif(importlib.util.find_spec(needs[b]) is None,
                                                            reason=f"{needs[b]} is not installed"))
            for b in BACKENDS]


def torch_probe(weights=(0.5, -0.5, 1.0, 2.0), bias: float = 0.1, loss: str = "mse"):
    import torch
    from torch import nn

    class TorchProbe(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 1)
            with torch.no_grad():
                self.linear.weight.copy_(torch.tensor([weights]))
                self.linear.bias.fill_(bias)

        def forward(self, x, labels=None, target=None, input_ids=None, attention_mask=None):
            h = self.linear(x)
            PROBE_DTYPES.append(h.dtype)
            y = h[..., 0].float()
            if loss == "mean":  # d loss / d w = the batch mean of x: the optimizer test's known gradient
                return (y.mean(), y)
            wanted = labels if labels is not None else target
            if wanted is None:
                return (y,)
            return (((y - wanted.float()) ** 2).mean(), y)

    return TorchProbe()


def jax_probe(weights=(0.5, -0.5, 1.0, 2.0), bias: float = 0.1, loss: str = "mse"):
    import jax.numpy as jnp
    from flax import nnx

    class JaxProbe(nnx.Module):
        def __init__(self):
            self.linear = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
            self.linear.kernel.value = jnp.asarray(weights, jnp.float32).reshape(4, 1)
            self.linear.bias.value = jnp.full((1,), bias, jnp.float32)

        def __call__(self, x, labels=None, target=None, input_ids=None, attention_mask=None):
            h = self.linear(x)
            PROBE_DTYPES.append(h.dtype)
            y = h[..., 0].astype(jnp.float32)
            if loss == "mean":
                return {"loss": jnp.mean(y), "logits": y}
            wanted = labels if labels is not None else target
            if wanted is None:
                return {"logits": y}
            return {"loss": jnp.mean((y - wanted.astype(jnp.float32)) ** 2), "logits": y}

    return JaxProbe()


def probe(backend: str, **kw):
    return jax_probe(**kw) if backend == "jax" else torch_probe(**kw)


def probe_weights(backend: str, model) -> np.ndarray:
    """[w0, w1, w2, w3, b] of a probe model."""
    if backend == "jax":
        return np.concatenate([np.asarray(model.linear.kernel.value).reshape(-1), np.asarray(model.linear.bias.value)])
    return np.concatenate([model.linear.weight.detach().cpu().numpy().reshape(-1),
                           model.linear.bias.detach().cpu().numpy()])


def state_weights(trainer) -> np.ndarray:
    """[w0..w3, b] as the running backend state holds them (during or after train())."""
    if trainer.backend.name == "jax":
        params = trainer.backend.to_host(trainer._backend_state["params"])
        return np.concatenate([np.asarray(params["linear"]["kernel"]).reshape(-1), np.asarray(params["linear"]["bias"])])
    model = trainer._backend_state.model
    return np.concatenate([model.linear.weight.detach().cpu().numpy().reshape(-1),
                           model.linear.bias.detach().cpu().numpy()])


def rows(n: int, start: int = 0, seed: int = 0, seq: int = 6) -> list[dict]:
    """Rows with x[0] = their index, a regression label, a different `target`, and token columns."""
    rng = np.random.default_rng(seed + start)
    out = []
    for i in range(start, start + n):
        x = rng.normal(size=4).astype(np.float32)
        x[0] = float(i)
        ones = 1 + i % seq
        out.append({
            "x": x,
            "labels": np.float32(x[1:].sum()),
            "target": np.float32(-x[1]),
            "input_ids": np.arange(seq, dtype=np.int64) + i,
            "attention_mask": np.array([1] * ones + [0] * (seq - ones), dtype=np.int64),
        })
    return out


class RecordingCollator:
    """Stacks rows like the default collator and records each batch's row ids and keys."""

    def __init__(self):
        self.batches: list[tuple[list[int], list[str]]] = []

    def __call__(self, features):
        from xtrainer import default_data_collator

        batch = default_data_collator(features)
        self.batches.append(([int(v) for v in np.asarray(batch["x"])[:, 0]], sorted(batch)))
        return batch

    def ids(self, lo: int = 0, hi: int = 1000) -> list[list[int]]:
        """Row ids of the batches whose rows come from [lo, hi) (train rows vs eval rows)."""
        return [ids for ids, _ in self.batches if ids and lo <= ids[0] < hi]


BASE = dict(report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=1, learning_rate=0.01,
            train_sampling_strategy="sequential", per_device_train_batch_size=1, per_device_eval_batch_size=1)


def make_trainer(backend: str, output_dir, model=None, args_class=None, **kwargs):
    """A Trainer on `backend` over a probe (or `model`); kwargs go to TrainingArguments unless they are Trainer's."""
    import xtrainer

    trainer_keys = ("train_dataset", "eval_dataset", "data_collator", "compute_metrics", "callbacks")
    trainer_kwargs = {k: kwargs.pop(k) for k in trainer_keys if k in kwargs}
    args_class = args_class or xtrainer.TrainingArguments
    args = args_class(str(output_dir), backend=backend, **{**BASE, **kwargs})
    return xtrainer.Trainer(model=model if model is not None else probe(backend), args=args, **trainer_kwargs)
