"""Small JAX models for the backend tests: NNX (several output styles), linen, functional."""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp
from flax import nnx


class RegressionMLP(nnx.Module):
    """Returns {"loss", "logits"} given labels; dropout exercises the threaded RNG."""

    def __init__(self, rngs: nnx.Rngs, dropout: float = 0.0, hidden: int = 16):
        self.l1 = nnx.Linear(4, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, 1, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x, labels=None):
        y = self.l2(self.drop(nnx.relu(self.norm(self.l1(x)))))[..., 0]
        if labels is None:
            return {"logits": y}
        return {"loss": jnp.mean((y - labels) ** 2), "logits": y}


class LogitsOnlyClassifier(nnx.Module):
    """Returns logits only: the trainer computes the cross entropy from `labels`."""

    def __init__(self, rngs: nnx.Rngs, classes: int = 3):
        self.l1 = nnx.Linear(4, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, classes, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.tanh(self.l1(x)))


def regression_rows(n: int = 64, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    w = np.array([1.0, -2.0, 3.0, 0.5], np.float32)
    return [{"x": x[i], "labels": float(x[i] @ w)} for i in range(n)]


def classification_rows(n: int = 64, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return [{"x": x[i], "labels": int(np.argmax(x[i, :3]))} for i in range(n)]


def linen_regressor():
    import flax.linen as nn

    class Regressor(nn.Module):
        @nn.compact
        def __call__(self, x, labels=None, deterministic=True):
            h = nn.Dense(16)(x)
            h = nn.Dropout(0.1)(nn.relu(h), deterministic=deterministic)
            y = nn.Dense(1)(h)[..., 0]
            if labels is None:
                return {"logits": y}
            return {"loss": jnp.mean((y - labels) ** 2), "logits": y}

    module = Regressor()
    variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
    return module, variables


def functional_regressor():
    def init_fn(rng):
        k1, k2 = jax.random.split(rng)
        return {"w": jax.random.normal(k1, (4,)) * 0.1, "b": jnp.zeros(())}

    def apply_fn(params, inputs, *, rng, train):
        y = inputs["x"] @ params["w"] + params["b"]
        return {"loss": jnp.mean((y - inputs["labels"]) ** 2), "logits": y} if "labels" in inputs else y

    return init_fn, apply_fn
