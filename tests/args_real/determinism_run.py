"""Two seeded runs of a small MLP on the JAX backend with full_determinism=True, in a fresh process.

Run by test_full_determinism.py as `python determinism_run.py OUT.json` with XLA_FLAGS asking XLA to
dump what it compiles. TrainingArguments is created before JAX starts, as scripts do; the output
holds XLA_FLAGS as JAX saw it, and each run's losses and final parameters (as exact float32 bits).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from xtrainer import FunctionalModel, Trainer, TrainingArguments


def init(rng):
    import jax

    k1, k2 = jax.random.split(rng)
    return {"w1": jax.random.normal(k1, (4, 64)) * 0.5, "w2": jax.random.normal(k2, (64, 1)) * 0.5}


def apply(params, inputs, *, rng, train):
    import jax
    import jax.numpy as jnp

    h = jnp.tanh(inputs["x"] @ params["w1"])
    if train:  # dropout: the step's RNG is part of what must repeat
        h = jnp.where(jax.random.bernoulli(rng, 0.9, h.shape), h / 0.9, 0.0)
    y = (h @ params["w2"])[..., 0]
    return jnp.mean((y - inputs["labels"]) ** 2)


def run(args) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    rows = [{"x": x[i], "labels": np.float32(x[i].sum() ** 2)} for i in range(64)]
    trainer = Trainer(model=FunctionalModel(init, apply), args=args, train_dataset=rows)
    trainer.train()
    params = trainer.model.params
    return {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "params": {k: np.asarray(v, np.float32).view(np.uint32).tolist() for k, v in params.items()},
    }


def main() -> None:
    args = TrainingArguments(
        "/tmp/xtrainer-determinism-run", backend="jax", full_determinism=True, per_device_train_batch_size=1,
        gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-2, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=3,
    )
    import os

    flags_seen = os.environ.get("XLA_FLAGS", "")
    import jax

    devices = jax.device_count()  # starts JAX: XLA reads XLA_FLAGS here
    out = {"xla_flags": flags_seen, "devices": devices, "runs": [run(args), run(args)]}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
