"""Host-side cost of the JAX backend's per-step calls, side by side in one process (main lane, CPU).

Two things the front does every optimizer step besides the compiled compute:

1. calling the compiled step with the train state: the state as nnx Variables (what nnx.split
   gives) against the same arrays as plain nested dicts (what the backend keeps), through the AOT
   compiled object and through jax.jit's dispatch;
2. placing one window (input_ids + labels, int64 8x64) and its two scalars on the device: one
   make_array_from_process_local_data per array (the multi-process path), one batched device_put,
   and jnp.asarray (the one-device path), the scalars reused from a cache.

In 1 and 2 the step is trivial (it returns its input), so the figures are host time per call. A
third group runs Trainer.train() and a bare loop over the same compiled step on a model with almost
no compute: the difference is the front's own cost per step. Reported as microseconds per call and
as ratios to the first variant of each group:

    PYTHONPATH=. <main-lane python> bench/host_path.py [--calls 500]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec


def per_call_us(fn, calls: int) -> float:
    for _ in range(20):
        out = fn()
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(calls):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls * 1e6


def state_call_costs(calls: int) -> dict[str, float]:
    from xtrainer.models import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    _, variables = nnx.split(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    plain = nnx.to_pure_dict(variables) if hasattr(nnx, "to_pure_dict") else variables.to_pure_dict()
    tx = optax.adamw(1e-3)

    def touch(state, x):  # no compute: the call's own cost is what is measured
        return state, x + 1

    out = {}
    for name, params in (("nnx Variables", variables), ("plain arrays", plain)):
        params = jax.tree.map(jnp.copy, params)  # each variant donates its own copy
        box = {"state": {"params": params, "opt": tx.init(params)}, "x": jnp.zeros(())}
        compiled = jax.jit(touch, donate_argnums=0).lower(box["state"], box["x"]).compile()
        jitted = jax.jit(touch, donate_argnums=0)
        for how, fn in (("AOT compiled", compiled), ("jax.jit", jitted)):
            def call(fn=fn):
                box["state"], box["x"] = fn(box["state"], box["x"])
                return box["x"]

            out[f"state as {name}, {how}"] = per_call_us(call, calls)
        out[f"({name}: {len(jax.tree.leaves(box['state']))} leaves in the state)"] = None
    return out


def placement_costs(calls: int) -> dict[str, float]:
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = NamedSharding(mesh, PartitionSpec(None, "data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    ids, labels = np.zeros((1, 8, 64), np.int64), np.ones((1, 8, 64), np.int64)
    mask, items = np.ones((1,), np.float32), np.float32(504)
    cached = [jax.device_put(mask, replicated), jax.device_put(items, replicated)]
    return {
        "make_array_from_process_local_data x4": per_call_us(lambda: [
            jax.make_array_from_process_local_data(batch, ids), jax.make_array_from_process_local_data(batch, labels),
            jax.make_array_from_process_local_data(replicated, mask),
            jax.make_array_from_process_local_data(replicated, items)], calls),
        "one batched device_put (4 arrays)": per_call_us(
            lambda: jax.device_put([ids, labels, mask, items], [batch, batch, replicated, replicated]), calls),
        "jnp.asarray x2 + cached scalars": per_call_us(lambda: [jnp.asarray(ids), jnp.asarray(labels), *cached], calls),
    }


def front_loop_costs(steps: int) -> dict[str, float]:
    """Trainer.train() against a bare loop over the same compiled step, on a model with almost no compute."""
    import tempfile

    import xtrainer
    from harness import compile_bare_step, fresh_train_state, placed_step_inputs  # bench/ is this script's directory
    from xtrainer.model_wrappers import FunctionalModel

    def init(rng):
        return {"emb": jax.random.normal(rng, (1024, 8)) * 0.02, "out": jnp.zeros((8, 16))}

    def apply(params, inputs, *, rng, train):
        logits = params["emb"][inputs["input_ids"]] @ params["out"]
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    rng = np.random.default_rng(0)
    rows = [{"input_ids": [int(x) for x in rng.integers(0, 1024, 64)]} for _ in range(8 * steps)]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    warmup = 20

    def trainer():
        args = xtrainer.TrainingArguments(tempfile.mkdtemp(), backend="jax", per_device_train_batch_size=8,
                                          max_steps=steps, logging_steps=steps, save_strategy="no", report_to=[],
                                          disable_tqdm=True, train_sampling_strategy="sequential")
        model = FunctionalModel(init, apply, input_names=["input_ids", "labels"])
        return xtrainer.Trainer(model=model, args=args, train_dataset=rows)

    marks = {}

    class Clock(xtrainer.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                jax.block_until_ready(jax.live_arrays())
                marks["start"] = time.perf_counter()

    front = trainer()
    front.add_callback(Clock())
    front.train()  # the final log reads the loss back
    loop_us = (time.perf_counter() - marks["start"]) / (steps - warmup) * 1e6

    backend = trainer().backend
    inputs = placed_step_inputs(backend, rows, 8)  # placed before the clock starts
    state = fresh_train_state(backend, steps)
    compiled = compile_bare_step(backend, state, inputs)
    for i, ((arrays, mask, _), num_items) in enumerate(inputs):
        if i == warmup:
            jax.block_until_ready(state)
            start = time.perf_counter()
        state, metrics = compiled(state, arrays, mask, num_items)
    jax.block_until_ready(metrics["loss"])
    bare_us = (time.perf_counter() - start) / (steps - warmup) * 1e6
    return {"bare loop over the compiled step": bare_us, "Trainer.train()": loop_us,
            f"(front's own cost: {loop_us - bare_us:.0f} us per step)": None}


def report(title: str, figures: dict[str, float | None]) -> None:
    print(title)
    base = next(v for v in figures.values() if v is not None)
    for name, value in figures.items():
        if value is None:
            print(f"  {name}")
        else:
            print(f"  {name:42s} {value:8.1f} us/call   {base / value:5.2f}x the first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    cli = parser.parse_args()
    report("Calling the step with the train state (tiny benchmark Llama + AdamW state):", state_call_costs(cli.calls))
    report("Placing one window (8x64 input_ids + labels) and its two scalars:", placement_costs(cli.calls))
    report("Per optimizer step, a model with almost no compute (400 steps):", front_loop_costs(400))


if __name__ == "__main__":
    main()
