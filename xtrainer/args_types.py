"""Small value types that TrainingArguments fields hold: debug options, the parallel mode, accelerate options.

They carry the names and values transformers 5.x uses, so saved arguments and scripts that compare
against them keep working, without importing accelerate (which imports torch) when xtrainer is imported.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .trainer_utils import ExplicitEnum


class DebugOption(ExplicitEnum):
    """The words `TrainingArguments.debug` accepts."""

    UNDERFLOW_OVERFLOW = "underflow_overflow"
    TPU_METRICS_DEBUG = "tpu_metrics_debug"


class ParallelMode(enum.Enum):
    """How this process takes part in the run (`TrainingArguments.parallel_mode`); values as in transformers.

    - NOT_PARALLEL: one device, one process.
    - NOT_DISTRIBUTED: several devices driven by one process.
    - DISTRIBUTED: several processes (torchrun, or a multi-host JAX run).
    - TPU: a TPU (torch_xla, or JAX on TPU).
    """

    NOT_PARALLEL = "not_parallel"
    NOT_DISTRIBUTED = "not_distributed"
    DISTRIBUTED = "distributed"
    SAGEMAKER_MODEL_PARALLEL = "sagemaker_model_parallel"
    SAGEMAKER_DATA_PARALLEL = "sagemaker_data_parallel"
    TPU = "tpu"


@dataclass
class AcceleratorConfig:
    """The `accelerator_config` options of transformers (Accelerate's dataloader and accumulation switches).

    xtrainer does not run on Accelerate: each option keeps its transformers default and serialises as
    transformers writes it; which ones have an effect per backend is in docs/training_arguments.md.
    """

    split_batches: bool = field(default=False, metadata={"help": "Split one global batch across devices."})
    dispatch_batches: bool | None = field(
        default=None, metadata={"help": "Iterate the dataloader on the main process only and send slices to the others."}
    )
    even_batches: bool = field(default=True, metadata={"help": "Pad the last batch so every process gets one."})
    use_seedable_sampler: bool = field(default=True, metadata={"help": "Use a sampler seeded per epoch."})
    non_blocking: bool = field(default=False, metadata={"help": "Copy batches to the device without blocking."})
    gradient_accumulation_kwargs: dict | None = field(
        default=None, metadata={"help": "Accelerate's GradientAccumulationPlugin options (num_steps, ...)."}
    )
    use_configured_state: bool = field(
        default=False, metadata={"help": "Reuse an Accelerate state configured before the arguments were built."}
    )

    @classmethod
    def from_value(cls, value: Any) -> AcceleratorConfig:
        """Builds one from None, a dict, a JSON file path or an instance.

        Raises:
            ValueError: unknown keys, or a class instead of an instance.
        """
        if isinstance(value, cls):
            return value
        if value is None:
            return cls()
        if isinstance(value, type):
            raise ValueError("`accelerator_config` needs an AcceleratorConfig instance or a dict, not a class.")
        if isinstance(value, (str, os.PathLike)):
            with open(value, encoding="utf-8") as f:
                value = json.load(f)
        if hasattr(value, "to_dict") and not isinstance(value, dict):  # transformers' own AcceleratorConfig
            value = value.to_dict()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"`accelerator_config` has unknown keys {unknown}; known keys: {sorted(known)}.")
        return cls(**value)

    def to_dict(self) -> dict:
        """The options as transformers serialises them (without `use_configured_state`, which it consumes)."""
        out = dataclasses.asdict(self)
        out.pop("use_configured_state")
        return out

    def non_default(self) -> dict:
        """The options set to something other than their default."""
        defaults = type(self)()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(defaults, f.name)}


__all__ = ["AcceleratorConfig", "DebugOption", "ParallelMode"]
