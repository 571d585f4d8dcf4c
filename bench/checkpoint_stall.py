"""How long a checkpoint stops the step loop: synchronous saves against `async_checkpointing=True`.

The small reference Llama of harness.py (4 layers, hidden 256, vocab 2048, batch 8 x seq 128; the
Flax reference model on the JAX backend, transformers' LlamaForCausalLM on the torch backend, same
weights) trains for WARMUP + STEPS optimizer steps with a checkpoint every SAVE_EVERY steps, in
three variants per backend: no saves, synchronous saves, asynchronous saves. Each run is its own
process; the variants alternate within each repeat; medians over repeats.

Two figures per save:
- stall: main-thread time inside Trainer._save_checkpoint (synchronous: the whole save; async: the
  copy to host memory, trainer_state.json, the hand-off, and any wait for the previous save). On
  JAX the steps already dispatched to the device are drained first, outside the timing (the host
  runs ahead of the device, and a save must wait for the state it copies: that wait is compute).
- run cost: (wall time of the run with saves - the same run without saves) / saves. This includes
  what the background writer takes from the step loop on a shared CPU (2 cores here), and the wait
  for the last save at the end of training.

    PYTHONPATH=. <main-lane python> bench/checkpoint_stall.py [--repeats 3] [--backends jax,torch]
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

WARMUP, STEPS, SAVE_EVERY = 2, 15, 5
VARIANTS = ("none", "sync", "async")


def child(backend: str, variant: str) -> dict:
    import harness  # the small config, its HF model and data

    import xtrainer

    cfg = dict(harness.CONFIGS["small"])
    total = WARMUP + STEPS
    cfg.update(warmup=WARMUP, steps=STEPS)
    out_dir = tempfile.mkdtemp(prefix="xtrainer-stall-")
    model = harness.hf_model(cfg)
    if backend == "jax":
        from xtrainer.models import load_hf_llama

        model = load_hf_llama(model.state_dict(), model.config)
    args = xtrainer.TrainingArguments(
        out_dir, backend=backend, per_device_train_batch_size=cfg["batch"], max_steps=total, logging_steps=total,
        learning_rate=harness.LR, report_to=[], disable_tqdm=True, train_sampling_strategy="sequential",
        seed=harness.SEED, save_strategy="no" if variant == "none" else "steps", save_steps=SAVE_EVERY,
        save_total_limit=2, async_checkpointing=variant == "async",
    )
    trainer = xtrainer.Trainer(model=model, args=args, train_dataset=harness.rows(cfg))
    marks: dict = {}

    class Clock(xtrainer.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == WARMUP:
                if backend == "jax":
                    import jax

                    jax.block_until_ready(jax.live_arrays())
                marks["start"] = time.perf_counter()

    trainer.add_callback(Clock())
    stalls, waits = [], []
    real_save = trainer._save_checkpoint
    from xtrainer.checkpoint_writer import CheckpointWriter

    real_wait = CheckpointWriter.wait

    def timed_wait(self):
        t0 = time.perf_counter()
        try:
            real_wait(self)
        finally:
            waits.append(time.perf_counter() - t0)

    CheckpointWriter.wait = timed_wait

    def timed_save():
        if backend == "jax":
            # The host dispatches steps ahead of the device; a save reads the state, so it first waits
            # for the steps already queued. That is compute, not the save's cost: drain it outside.
            import jax

            jax.block_until_ready(jax.live_arrays())
        del waits[:]
        t0 = time.perf_counter()
        real_save()
        stalls.append((time.perf_counter() - t0, sum(waits)))

    trainer._save_checkpoint = timed_save
    trainer.train()  # ends after the last step and (async) after the last save is published
    end = time.perf_counter()
    saved = sorted(n for n in os.listdir(out_dir) if n.startswith("checkpoint-"))
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(out_dir, saved[-1])) for f in fs) if saved else 0
    return {"seconds": end - marks["start"], "stalls": [s for s, _ in stalls], "waits": [w for _, w in stalls],
            "checkpoint_mb": size / 2**20}


def run_child(backend: str, variant: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([sys.executable, __file__, "--child", backend, variant], capture_output=True, text=True,
                          env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT=")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{backend}/{variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT="):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="jax,torch")
    parser.add_argument("--child", nargs=2)
    opts = parser.parse_args()
    if opts.child:
        print("RESULT=" + json.dumps(child(*opts.child)), flush=True)
        return
    results: dict = {}
    for repeat in range(opts.repeats):
        for backend in opts.backends.split(","):
            order = VARIANTS if repeat % 2 == 0 else tuple(reversed(VARIANTS))
            for variant in order:
                result = run_child(backend, variant)
                results.setdefault((backend, variant), []).append(result)
                print(f"repeat {repeat} {backend:5s} {variant:5s} {result['seconds']:.2f}s "
                      f"stalls {[round(s * 1000) for s in result['stalls']]} ms "
                      f"(waiting {[round(w * 1000) for w in result['waits']]} ms)", flush=True)
    print(f"\nsmall Llama, {STEPS} timed steps after {WARMUP} warm-up steps, a save every {SAVE_EVERY} steps and at the "
          f"end; medians of {opts.repeats} runs:")
    print("| backend | saving | saves | stall per save (ms) | of which waiting for the previous save (ms) "
          "| run cost per save (ms) | ms/step without saves | checkpoint (MB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for backend in opts.backends.split(","):
        base = statistics.median(r["seconds"] for r in results[(backend, "none")])
        for variant in ("sync", "async"):
            runs = results[(backend, variant)]
            saves = len(runs[0]["stalls"])
            stall = statistics.median(statistics.median(r["stalls"]) for r in runs)
            wait = statistics.median(statistics.median(r["waits"]) for r in runs)
            cost = (statistics.median(r["seconds"] for r in runs) - base) / saves
            size = runs[0]["checkpoint_mb"]
            print(f"| {backend} | {variant} | {saves} | {stall * 1000:.0f} | {wait * 1000:.0f} | {cost * 1000:.0f} "
                  f"| {base / STEPS * 1000:.0f} | {size:.1f} |")


if __name__ == "__main__":
    main()
