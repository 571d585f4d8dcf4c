"""`trainer.accelerator`: what code written against transformers' accelerate.Accelerator reads, answered by
xtrainer.

transformers' Trainer runs through an accelerate Accelerator and libraries built on it (TRL, ...) read it:
`trainer.accelerator.is_main_process`, `.device`, `.gather(x)`, `.unwrap_model(m)`, `.wait_for_everyone()`.
xtrainer does not use accelerate; this view answers those questions from the Trainer's backend. An
Accelerator feature it cannot provide raises AttributeError naming it and saying why.
"""

from __future__ import annotations

from typing import Any


class AcceleratorView:
    """A stand-in for accelerate.Accelerator backed by an xtrainer Trainer (see the module docstring)."""

    def __init__(self, trainer):
        self._trainer = trainer

    # ---- the process layout
    @property
    def num_processes(self) -> int:
        return self._trainer.backend.num_processes

    @property
    def process_index(self) -> int:
        return self._trainer.backend.process_index

    @property
    def local_process_index(self) -> int:
        return self._trainer.args.local_process_index

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        return self.local_process_index == 0

    @property
    def device(self):
        return self._trainer.args.device

    @property
    def distributed_type(self) -> str:
        return "MULTI" if self.num_processes > 1 else "NO"

    # ---- the settings transformers hands to accelerate
    @property
    def gradient_accumulation_steps(self) -> int:
        return self._trainer.args.gradient_accumulation_steps

    @property
    def mixed_precision(self) -> str:
        args = self._trainer.args
        return "bf16" if args.bf16 else "fp16" if args.fp16 else "no"

    def __getattr__(self, name: str) -> Any:
        config = self.__dict__["_trainer"].args.accelerator_config
        if name in ("split_batches", "dispatch_batches", "even_batches", "use_seedable_sampler", "non_blocking"):
            return getattr(config, name)
        raise AttributeError(
            f"trainer.accelerator.{name}: xtrainer does not run accelerate, and its stand-in answers only the process "
            "layout (num_processes, process_index, is_main_process, device), gather, unwrap_model, "
            "wait_for_everyone, print and the accelerator_config settings."
        )

    # ---- the calls libraries make
    def unwrap_model(self, model, keep_fp32_wrapper: bool = True):
        # DataParallel and DistributedDataParallel keep the user's model in `.module`; compiled
        # modules in `_orig_mod`. Matched by class name so torch need not be imported here.
        while type(model).__name__ in ("DataParallel", "DistributedDataParallel") and hasattr(model, "module"):
            model = model.module
        inner = getattr(model, "_orig_mod", None)  # torch.compile
        return inner if inner is not None else model

    def wait_for_everyone(self) -> None:
        self._trainer.backend.barrier()

    def gather(self, value):
        """Every process's `value`, concatenated (identity on one process; evaluation already sees all data)."""
        if self.num_processes == 1:
            return value
        raise AttributeError("trainer.accelerator.gather across processes is not provided; xtrainer evaluates the whole "
                             "eval set on every process, so results need no gathering.")

    gather_for_metrics = gather

    def print(self, *args, **kwargs) -> None:
        if self.is_local_main_process:
            print(*args, **kwargs)

    def end_training(self) -> None:
        self._trainer.end()
