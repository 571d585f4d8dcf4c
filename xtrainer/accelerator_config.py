"""`TrainingArguments.accelerator_config`: transformers' accelerate options, kept for compatibility.

transformers hands these to accelerate's data loaders and gradient-accumulation plugin. xtrainer's loop and
data pipeline do not run through accelerate, so no key changes how xtrainer trains: a value other than the
default is reported once at Trainer construction (xtrainer/args_support.py) with what to use instead.
The object reads and serialises like transformers' AcceleratorConfig, so scripts and saved JSON keep working.
One key does act: `gradient_accumulation_kwargs={"num_steps": N}` sets gradient_accumulation_steps (when that is
left at 1), as transformers does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field


@dataclass
class AcceleratorConfig:
    """accelerate's data-loader and accumulation options (transformers' field names and defaults)."""

    split_batches: bool = False
    dispatch_batches: bool | None = None
    even_batches: bool = True
    use_seedable_sampler: bool = True
    non_blocking: bool = False
    gradient_accumulation_kwargs: dict | None = None
    use_configured_state: bool = field(default=False, repr=False)

    @classmethod
    def from_json_file(cls, json_file: str) -> AcceleratorConfig:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}})

    @classmethod
    def from_value(cls, value) -> AcceleratorConfig:
        """None, a dict, a JSON file path or an AcceleratorConfig (also transformers' own) -> AcceleratorConfig."""
        if value is None:
            return cls()
        if isinstance(value, type):
            raise NotImplementedError(
                "accelerator_config got a class, not an instance or a dict: pass AcceleratorConfig(...) or a dict."
            )
        if isinstance(value, cls):
            return value
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"accelerator_config has unknown keys {unknown}; known: "
                                 f"{[f.name for f in dataclasses.fields(cls)]}.")
            return cls(**value)
        if isinstance(value, str):
            return cls.from_json_file(value)
        if hasattr(value, "to_dict"):
            return cls.from_value({k: v for k, v in value.to_dict().items()})
        raise ValueError(f"accelerator_config must be a dict, a JSON file path or an AcceleratorConfig, got {value!r}.")

    def to_dict(self) -> dict:
        """The options as transformers writes them (use_configured_state is consumed at setup, not saved)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "use_configured_state"}

    def pop(self, key: str, default=None):
        return getattr(self, key, default)

    def is_default(self) -> bool:
        return self.to_dict() == AcceleratorConfig().to_dict()
