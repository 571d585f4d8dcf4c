"""Training runs of a tiny GPT-2 with xtrainer's torch backend, for tests/backends/torch/test_distributed.py.

Launched by the test under `torchrun --nproc_per_node=2` (or plain `python` for one process):

    python -m torch.distributed.run --nproc_per_node=2 dist_worker.py --out DIR --batch 2
        --strategies ddp fsdp [--resume] [--cross-resume CKPT]

For each strategy S (DDP, or FSDP2 with fsdp="full_shard") it trains for MAX_STEPS optimizer steps
with a checkpoint every SAVE_STEPS into DIR/S/run and exports the final model with
`trainer.save_model(DIR/S/final)`. With --resume it then deletes the last checkpoint, trains a
freshly (differently) initialised model resumed from the first checkpoint, and exports that one to
DIR/S/resumed; --cross-resume CKPT does the same from a checkpoint another topology wrote, into
DIR/S/cross. Rank 0 adds log_history.json and checks.json to each export.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import torch
import torch.distributed as dist

from xtrainer import Trainer, TrainingArguments

MAX_STEPS = 6
SAVE_STEPS = 3
GRAD_ACCUM = 2
NUM_EXAMPLES = 32  # 8 global micro-batches of 4 = 4 steps an epoch: the resume lands mid-epoch
SEQ = 12
VOCAB = 64


def tiny_gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    # Dropout 0: the processes and the one-process reference must compute the same function.
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def lm_data() -> list[dict]:
    """Token rows whose labels mask a varying tail, so every micro-batch counts different tokens."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(NUM_EXAMPLES):
        ids = rng.integers(0, VOCAB, size=SEQ).astype(np.int64)
        labels = ids.copy()
        labels[SEQ - (i % 5):] = -100
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return rows


def make_args(run_dir: str, batch: int, fsdp: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=run_dir,
        backend="torch",
        use_cpu=True,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=GRAD_ACCUM,
        train_sampling_strategy="sequential",
        max_steps=MAX_STEPS,
        save_steps=SAVE_STEPS,
        learning_rate=1e-2,
        weight_decay=0.1,
        warmup_steps=2,
        max_grad_norm=1.0,
        logging_steps=1,
        seed=0,
        fsdp="full_shard" if fsdp else None,
        ddp_timeout=120,  # a collective that hangs fails the test instead of waiting 30 minutes
        disable_tqdm=True,
        report_to="none",
    )


def model_weights(model) -> dict[str, torch.Tensor]:
    """The full weights `trainer.model` holds (FSDP2 shards are gathered: collective)."""
    state = model.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone() for k, v in state.items()}


def train_and_export(run_dir: str, export_dir: str, batch: int, fsdp: bool, seed: int = 0, resume_from=None) -> None:
    """Trains, then writes trainer.save_model(export_dir) plus (rank 0) log_history.json and checks.json.

    checks.json records how far the weights in `trainer.model` are from the exported file.
    """
    trainer = Trainer(model=tiny_gpt2(seed), args=make_args(run_dir, batch, fsdp), train_dataset=lm_data())
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(export_dir)
    held = model_weights(trainer.model)
    if trainer.is_world_process_zero():
        from safetensors.torch import load_file

        saved = load_file(os.path.join(export_dir, "model.safetensors"))
        checks = {
            "saved_keys_missing_from_model": sorted(set(saved) - set(held)),
            "model_vs_saved_max_diff": max(float((held[k] - v).abs().max()) for k, v in saved.items()),
            "world_size": trainer.backend.num_processes,
        }
        with open(os.path.join(export_dir, "checks.json"), "w") as f:
            json.dump(checks, f)
        with open(os.path.join(export_dir, "log_history.json"), "w") as f:
            json.dump(trainer.state.log_history, f)
    trainer.backend.barrier()


def run_strategy(out: str, batch: int, fsdp: bool, resume: bool, cross_resume: str | None) -> None:
    """The runs of one strategy, under `out`: run/ (checkpoints), final/, resumed/, cross/."""
    run_dir = os.path.join(out, "run")
    train_and_export(run_dir, os.path.join(out, "final"), batch, fsdp)
    if resume:
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(os.path.join(run_dir, f"checkpoint-{MAX_STEPS}"))
        if dist.is_initialized():
            dist.barrier()
        # Another initialisation: everything the resumed run ends with must come from the checkpoint.
        train_and_export(run_dir, os.path.join(out, "resumed"), batch, fsdp, seed=1,
                         resume_from=os.path.join(run_dir, f"checkpoint-{SAVE_STEPS}"))
    if cross_resume:
        train_and_export(os.path.join(out, "cross_run"), os.path.join(out, "cross"), batch, fsdp, seed=1,
                         resume_from=cross_resume)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--strategies", nargs="+", choices=["ddp", "fsdp"], default=["ddp"],
                        help="run each in turn, into OUT/<strategy>/ (one launch pays the start-up once)")
    parser.add_argument("--resume", action="store_true", help="also resume from checkpoint-3 of the same run")
    parser.add_argument("--cross-resume", help="also resume from this checkpoint, written by another topology")
    opts = parser.parse_args()
    for strategy in opts.strategies:
        run_strategy(os.path.join(opts.out, strategy), opts.batch, strategy == "fsdp", opts.resume, opts.cross_resume)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
