"""FSDP2 runs with one fsdp_config key each, for test_fsdp_config.py (torchrun, 2 processes, gloo on CPU).

    python -m torch.distributed.run --nproc_per_node=2 fsdp_worker.py --out DIR CASE [CASE ...]

Each case trains the tiny GPT-2 of tests/backends/torch/dist_worker.py (per-process batch 2, so the global
batch equals the one-process reference's 4) and writes, on rank 0, DIR/CASE/result.json: the logged
losses, the final weights (gathered), and what the case inspects in the sharded model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from xtrainer import Trainer, TrainerCallback

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("xtrainer_dist_worker", HERE.parents[0] / "backends/torch/dist_worker.py")
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

STEPS = 4

CASES = {
    "reshard_false": {"fsdp": True, "fsdp_config": {"reshard_after_forward": False}},
    "size_wrap": {"fsdp": True, "fsdp_config": {"min_num_params": 1000}},
    "no_wrap": {"fsdp": True, "fsdp_config": {"auto_wrap_policy": "NO_WRAP"}},
    "checkpointing": {"fsdp": True, "fsdp_config": {"activation_checkpointing": True}},
    "mixed_precision": {"fsdp": True, "fsdp_config": {"mixed_precision_policy": {"param_dtype": "bfloat16"}}},
    "ram_efficient": {"fsdp": True, "fsdp_config": {"cpu_ram_efficient_loading": True}},
    "sharded_state": {"fsdp": True, "fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"}},
    "hybrid": {"fsdp": "hybrid_shard"},
}


def make_args(run_dir: str, batch: int, **fsdp) -> object:
    args = base.make_args(run_dir, batch, fsdp=False)
    args.max_steps, args.save_steps = STEPS, 2
    for key, value in fsdp.items():
        setattr(args, key, value)
    return args


class ForwardProbe(TrainerCallback):
    """Records the dtype of the first block's attention weight as its forward passes see it, and how
    many times it runs (activation checkpointing runs it again in the backward pass)."""

    def __init__(self, model):
        self.seen, self.calls = set(), 0
        model.transformer.h[0].attn.c_attn.register_forward_pre_hook(self.record)

    def record(self, module, inputs):
        self.seen.add(str(module.weight.dtype))
        self.calls += 1


def units(model) -> dict:
    from torch.distributed.fsdp import FSDPModule

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            group = state._fsdp_param_group
            out[name or "<root>"] = {"reshard_after_forward": group is not None and group.post_forward_mesh_info is not None,
                                     "mesh": list(group.mesh_info.mesh.shape) if group is not None else None}
    return out


def run_case(out: Path, case: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    fsdp = CASES[case]
    if case == "hybrid":
        os.environ["LOCAL_WORLD_SIZE"] = "1"  # as if each process were a node: replicate x2, shard x1
    if case == "ram_efficient" and rank != 0:
        with torch.device("meta"):
            model = base.tiny_gpt2(seed=5)  # no weights at all: everything comes from rank 0
    else:
        model = base.tiny_gpt2(seed=0)
    probe = ForwardProbe(model)
    trainer = Trainer(model=model, args=make_args(str(out / case / "run"), 2, **fsdp), train_dataset=base.lm_data(),
                      callbacks=[probe])
    trainer.train()
    result = {"units": units(trainer.model), "forward_dtypes": sorted(probe.seen), "forward_calls": probe.calls,
              "checkpoint_files": sorted(os.listdir(out / case / "run" / "checkpoint-2")),
              "checkpoint_wrappers": sum(hasattr(m, "_checkpoint_wrapped_module") for m in trainer.model.modules())}
    if case == "sharded_state":  # resume from the sharded checkpoint, from another initialisation
        resumed = Trainer(model=base.tiny_gpt2(seed=1), args=make_args(str(out / case / "resumed"), 2, **fsdp),
                          train_dataset=base.lm_data())
        resumed.train(resume_from_checkpoint=str(out / case / "run" / "checkpoint-2"))
        result["resumed_weights"] = {k: v.tolist() for k, v in base.model_weights(resumed.model).items()}
    weights = base.model_weights(trainer.model)
    if trainer.is_world_process_zero():
        result["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result["weights"] = {k: v.tolist() for k, v in weights.items()}
        with open(out / case / "result.json", "w") as f:
            json.dump(result, f)
    trainer.backend.barrier()
    if case == "hybrid":
        os.environ["LOCAL_WORLD_SIZE"] = os.environ.get("WORLD_SIZE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("cases", nargs="+", choices=sorted(CASES))
    opts = parser.parse_args()
    for case in opts.cases:
        run_case(Path(opts.out), case)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
