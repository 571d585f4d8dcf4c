"""One-shot accelerator check: tokens/s and MFU of xtrainer's JAX backend on a GPU (or TPU).

Trains the reference Flax Llama through the real `Trainer` (backend="jax", bf16 compute, fp32
master weights, AdamW) on synthetic tokens for a few steps per config, and prints, per config:
parameters, tokens/s, step time, time to first step (compile) and MFU against the chip's dense
bf16 peak. Optionally (`--torch`) the same config as transformers' LlamaForCausalLM on xtrainer's
torch backend (bf16 autocast), for a side-by-side figure on the same card.

    bash bench/gpu_check.sh                       # small + llama-350m, JAX backend
    python bench/gpu_check.py --configs small --steps 5 --warmup 2   # quick run (works on CPU too)

MFU = tokens/s x FLOPs/token / peak, with FLOPs/token = 6N + 12 x layers x hidden x seq (the model
FLOPs convention MaxText reports: parameter matmuls forward and backward plus attention scores).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

CONFIGS = {
    # the harness's compute-bound CPU config, with a GPU-sized batch
    "small": dict(layers=4, hidden=256, heads=4, kv_heads=4, inter=512, vocab=2048, seq=128, batch=64),
    # ~350M parameters: 24 x (4 x 1024^2 + 3 x 1024 x 2816) + 2 x 32000 x 1024 ~= 374M
    "llama-350m": dict(layers=24, hidden=1024, heads=16, kv_heads=16, inter=2816, vocab=32000, seq=1024, batch=16),
}

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (no sparsity).
PEAK_BF16 = [
    ("h200", 989e12), ("h100 pcie", 756e12), ("h100", 989e12), ("gh200", 989e12), ("a100", 312e12),
    ("l4", 121e12), ("a10", 125e12), ("v6", 918e12), ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12),
    ("v4", 275e12),
]


def param_count(cfg) -> int:
    h, i, v, n = cfg["hidden"], cfg["inter"], cfg["vocab"], cfg["layers"]
    kv_dim = h * cfg["kv_heads"] // cfg["heads"]
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * i + 2 * h
    return 2 * v * h + n * per_layer + h


def flops_per_token(cfg) -> float:
    return 6 * param_count(cfg) + 12 * cfg["layers"] * cfg["hidden"] * cfg["seq"]


def peak_flops(device_kind: str) -> float | None:
    override = os.environ.get("XTRAINER_PEAK_FLOPS")
    if override:
        return float(override)
    kind = device_kind.lower()
    for key, value in PEAK_BF16:
        if key in kind:
            return value
    return None


def synthetic_rows(cfg, n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    starts = rng.integers(0, cfg["vocab"], size=n)
    ids = (starts[:, None] + np.arange(cfg["seq"])[None, :]) % cfg["vocab"]
    return [{"input_ids": row, "labels": row.copy()} for row in ids.astype(np.int64)]


def build_model(cfg, backend: str):
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["inter"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
        max_position_embeddings=cfg["seq"], tie_word_embeddings=False,
    )
    if backend == "torch":
        import torch

        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(hf_cfg)
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    from xtrainer.models import LlamaConfig, LlamaForCausalLM

    config = dataclasses.replace(LlamaConfig.from_hf(hf_cfg), dtype=jnp.bfloat16)
    return LlamaForCausalLM(config, rngs=nnx.Rngs(0))


def run(cfg_name: str, backend: str, steps: int, warmup: int, batch: int | None) -> dict:
    import xtrainer

    cfg = dict(CONFIGS[cfg_name])
    if batch:
        cfg["batch"] = batch
    total = warmup + steps
    marks: dict[str, float] = {}

    def drain():
        if backend == "jax":
            import jax

            jax.block_until_ready(jax.live_arrays())
        else:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()

    class Clock(xtrainer.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (1, warmup):
                drain()
                now = time.perf_counter()
                if state.global_step == 1:
                    marks["first"] = now
                if state.global_step == warmup:
                    marks["start"] = now

    args = xtrainer.TrainingArguments(
        tempfile.mkdtemp(prefix="xtrainer-gpu-check-"), backend=backend, bf16=True,
        per_device_train_batch_size=cfg["batch"], max_steps=total, logging_steps=total, learning_rate=3e-4,
        warmup_steps=0, save_strategy="no", report_to=[], disable_tqdm=True, train_sampling_strategy="sequential",
        dataloader_num_workers=0, seed=0,
    )
    model = build_model(cfg, backend)
    trainer = xtrainer.Trainer(model=model, args=args, train_dataset=synthetic_rows(cfg, cfg["batch"] * 64),
                               callbacks=[Clock()])
    global_batch = args.per_device_train_batch_size * trainer.backend.local_batch_devices
    t0 = time.perf_counter()
    out = trainer.train()  # the final log reads the loss back, so the last step has finished
    end = time.perf_counter()
    step_s = (end - marks["start"]) / steps
    tokens_s = global_batch * cfg["seq"] / step_s
    if backend == "jax":
        import jax

        devices = jax.devices()
        kind, count = devices[0].device_kind, len(devices)
    else:
        import torch

        kind = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        count = max(torch.cuda.device_count(), 1)
    peak = peak_flops(kind)
    mfu = tokens_s * flops_per_token(cfg) / (peak * count) if peak else None
    return dict(config=cfg_name, backend=backend, device=f"{count} x {kind}", params=param_count(cfg),
                global_batch=global_batch, seq=cfg["seq"], step_ms=1000 * step_s, tokens_s=tokens_s,
                first_step_s=marks["first"] - t0, mfu=mfu, loss=float(out.training_loss))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="small,llama-350m")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compile) per config")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch (overrides the config's)")
    parser.add_argument("--torch", action="store_true", help="also run xtrainer's torch backend (bf16 autocast)")
    cli = parser.parse_args()
    if cli.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step compiles)")
    backends = ["jax"] + (["torch"] if cli.torch else [])
    print(f"{'config':<11} {'backend':<6} {'device':<28} {'params':>8} {'batch':>5} {'seq':>5} "
          f"{'ms/step':>9} {'tokens/s':>10} {'first(s)':>8} {'MFU':>6} {'loss':>7}")
    for name in cli.configs.split(","):
        if name not in CONFIGS:
            parser.error(f"unknown config {name!r}; choose from {sorted(CONFIGS)}")
        for backend in backends:
            r = run(name, backend, cli.steps, cli.warmup, cli.batch)
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(f"{r['config']:<11} {r['backend']:<6} {r['device'][:28]:<28} {r['params'] / 1e6:>7.1f}M "
                  f"{r['global_batch']:>5} {r['seq']:>5} {r['step_ms']:>9.1f} {r['tokens_s']:>10.0f} "
                  f"{r['first_step_s']:>8.1f} {mfu:>6} {r['loss']:>7.3f}", flush=True)
    print("MFU: tokens/s x (6N + 12 x layers x hidden x seq) / dense bf16 peak of the chip "
          "(XTRAINER_PEAK_FLOPS overrides the table; n/a when the chip is not in the table).")


if __name__ == "__main__":
    main()
