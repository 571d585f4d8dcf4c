"""Step time of one tiny GPT-2 on torch eager, on JAX through torchax, and on torch_xla (XLA lane, CPU).

Each contender runs in its own process (torch_xla and JAX each own their runtime), alternating,
and the median over repeats is reported as seconds per optimizer step after warm-up (compile),
with the ratio to torch eager. On this shared 2-core CPU only the ratios are meaningful.

    PYTHONPATH=. <xla-lane python> bench/xla_step_time.py [--repeats 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

WARMUP = 3


def run_one(backend: str, steps: int) -> float:
    import torch
    import transformers

    import xtrainer

    config = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1024, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    rows = [{"input_ids": [(i + j) % 1024 for j in range(64)], "labels": [(i + j) % 1024 for j in range(64)]}
            for i in range(8 * (steps + WARMUP))]
    marks = {}

    class Clock(xtrainer.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == WARMUP:
                marks["start"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            marks["end"] = time.perf_counter()

    args = xtrainer.TrainingArguments(tempfile.mkdtemp(), backend=backend, per_device_train_batch_size=8,
                                      max_steps=steps + WARMUP, logging_steps=steps + WARMUP, save_strategy="no",
                                      report_to="none", disable_tqdm=True, train_sampling_strategy="sequential")
    trainer = xtrainer.Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()])
    trainer.train()  # the final log reads the loss back, so `end` follows the last step's completion
    return (marks["end"] - marks["start"]) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.one:
        print("RESULT", json.dumps(run_one(cli.one, cli.steps)))
        return
    contenders = ["torch", "jax", "torch_xla"]
    times: dict[str, list[float]] = {c: [] for c in contenders}
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1")
    env.pop("XLA_FLAGS", None)
    for _ in range(cli.repeats):
        for backend in contenders:  # interleaved, so load changes hit every contender alike
            out = subprocess.run([sys.executable, __file__, "--one", backend, "--steps", str(cli.steps)],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"{backend} failed:\n{out.stderr[-2000:]}")
                continue
            times[backend].append(json.loads(out.stdout.split("RESULT", 1)[1]))
    base = statistics.median(times["torch"])
    print(f"tiny GPT-2 (2 layers, d=128, batch 8 x 64 tokens), {cli.steps} timed steps, median of {cli.repeats}")
    for backend in contenders:
        if times[backend]:
            med = statistics.median(times[backend])
            label = {"torch": "torch eager", "jax": "JAX via torchax", "torch_xla": "torch_xla (CPU)"}[backend]
            print(f"  {label:18s} {med * 1000:8.1f} ms/step   speed vs torch eager: {base / med:.2f}x")


if __name__ == "__main__":
    main()
