"""Seconds per optimizer step of the test's tiny GPT-2: backend="torch_xla" (PJRT CPU, 4 devices) vs torch eager.

Not a test (pytest does not collect it). Each backend trains the same model on the same data through
the Trainer; the time of the steps after warm-up (compilation) is divided by their number. The
loss is logged once at the end only, so no step waits for the device; torch_xla's queue is drained
before the clock stops.

    PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 PYTHONPATH=.:tests <xla-lane python> tests/backends/torch_xla/step_time.py [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("CPU_NUM_DEVICES", "4")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch_xla.core.xla_model as xm  # noqa: E402
import torch_xla.runtime as xr  # noqa: E402
import transformers  # noqa: E402

import xtrainer  # noqa: E402

WARMUP = 5


class Clock(transformers.TrainerCallback):
    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def tiny_gpt2(n_layer, n_embd):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=64, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def run(backend: str, steps: int, n_layer: int, n_embd: int) -> float:
    rng = np.random.default_rng(0)
    data = [{"input_ids": ids.tolist(), "labels": ids.tolist()} for ids in rng.integers(0, 64, size=(8 * steps, 16))]
    per_device = 2 if backend == "torch_xla" else 8  # a global batch of 8 either way (4 XLA devices)
    args = xtrainer.TrainingArguments(
        f"/tmp/xtrainer_step_time_{backend}", backend=backend, per_device_train_batch_size=per_device,
        max_steps=steps, logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True,
        train_sampling_strategy="sequential", learning_rate=1e-3,
    )
    clock = Clock()
    trainer = xtrainer.Trainer(model=tiny_gpt2(n_layer, n_embd), args=args, train_dataset=data, callbacks=[clock])
    trainer.train()
    if backend == "torch_xla":
        xm.wait_device_ops()
        clock.ends[-1] = max(clock.ends[-1], time.perf_counter())
    return (clock.ends[-1] - clock.ends[WARMUP - 1]) / (len(clock.ends) - WARMUP)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--n-layer", type=int, default=1)
    parser.add_argument("--n-embd", type=int, default=32)
    opts = parser.parse_args()
    xr.use_spmd()
    xr.global_runtime_device_count()  # start the XLA runtime before any backward pass (pytorch/xla#4174)
    results = {backend: run(backend, opts.steps, opts.n_layer, opts.n_embd) for backend in ("torch", "torch_xla")}
    for backend, seconds in results.items():
        print(f"{backend:10s} {seconds * 1e3:8.2f} ms/step")
    print(f"torch_xla / torch = {results['torch_xla'] / results['torch']:.2f}")


if __name__ == "__main__":
    main()
