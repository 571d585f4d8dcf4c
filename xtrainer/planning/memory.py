"""Whether a compiled step fits in a device's memory, and what to change when it does not.

Used by `xtrainer plan` (against the HBM of a TPU preset) and by `auto_find_batch_size` on the JAX
backend (against the memory of the devices the run has), so both judge a step the same way.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

GIB = 1024**3
DEVICE_MEMORY_ENV = "XTRAINER_DEVICE_MEMORY_BYTES"


@dataclass(frozen=True)
class StepMemory:
    """Per-device memory of a compiled step, from XLA's memory analysis (bytes)."""

    arguments: int
    outputs: int
    aliased: int  # outputs that reuse donated argument buffers (the train state)
    temporaries: int
    generated_code: int

    @property
    def total(self) -> int:
        """What the step holds at once: arguments, outputs that are not aliased, temporaries and code."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

    @classmethod
    def of(cls, compiled) -> StepMemory:
        analysis = compiled.memory_analysis()
        if isinstance(analysis, (list, tuple)):  # older jax: one per executable
            analysis = analysis[0]
        return cls(
            arguments=int(analysis.argument_size_in_bytes),
            outputs=int(analysis.output_size_in_bytes),
            aliased=int(analysis.alias_size_in_bytes),
            temporaries=int(analysis.temp_size_in_bytes),
            generated_code=int(analysis.generated_code_size_in_bytes),
        )

    def as_dict(self) -> dict[str, int]:
        return {"arguments": self.arguments, "outputs": self.outputs, "aliased": self.aliased,
                "temporaries": self.temporaries, "generated_code": self.generated_code, "total": self.total}


class StepDoesNotFit(MemoryError):
    """A train step needs more device memory than the device has.

    Attributes:
        needed / available: bytes per device (needed may be None when the compiler gave up early).
        largest_batch: the largest per-device batch that fits, when a search found one.
    """

    def __init__(self, message: str, needed: int | None = None, available: int | None = None,
                 largest_batch: int | None = None):
        super().__init__(message)
        self.needed, self.available, self.largest_batch = needed, available, largest_batch


def is_resource_exhausted(exc: BaseException) -> bool:
    """XLA's out-of-memory: RESOURCE_EXHAUSTED at compile time (TPU) or when a step runs."""
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def compiler_allocations(exc: BaseException, limit: int = 8) -> list[str]:
    """The largest allocations XLA:TPU lists in its out-of-memory message (one line each), if any."""
    lines = []
    for line in str(exc).splitlines():
        line = line.strip()
        if re.match(r"^(\d+\.\s+)?Size:", line) or line.startswith(("Operator:", "Shape:")):
            lines.append(line)
    return lines[: 3 * limit]


def device_memory_limit(devices) -> int | None:
    """Bytes a step may use on each of these devices: $XTRAINER_DEVICE_MEMORY_BYTES, else what the
    runtime reports (`memory_stats()["bytes_limit"]` on TPU and GPU), else None (CPU: unknown)."""
    override = os.environ.get(DEVICE_MEMORY_ENV)
    if override:
        try:
            value = int(float(override))
        except ValueError as exc:
            raise ValueError(f"{DEVICE_MEMORY_ENV}={override!r} is not a number of bytes.") from exc
        if value <= 0:
            raise ValueError(f"{DEVICE_MEMORY_ENV} must be positive, got {override!r}.")
        return value
    limits = []
    for device in devices:
        try:
            stats = device.memory_stats() or {}
        except Exception:  # noqa: BLE001 - CPU and non-addressable devices have no memory stats
            return None
        if "bytes_limit" not in stats:
            return None
        limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def fit_knobs(*, per_device_batch: int, remat: bool, mesh: dict[str, int], optimizer_bytes: int,
              param_bytes: int, largest_batch: int | None = None) -> list[str]:
    """The settings that lower per-device memory, most effective first, with concrete values."""
    knobs = []
    if largest_batch:
        knobs.append(f"per_device_train_batch_size={largest_batch} fits (now {per_device_batch}); keep the global "
                     f"batch with gradient_accumulation_steps x{max(1, per_device_batch // largest_batch)}")
    elif per_device_batch > 1:
        knobs.append(f"a smaller per_device_train_batch_size (now {per_device_batch}; try {per_device_batch // 2}) "
                     "with more gradient_accumulation_steps")
    if not remat:
        knobs.append("activation rematerialisation: recompute each layer in the backward pass (reference Llama: "
                     "LlamaConfig(remat=True); remat_policy='minimal' keeps the projections)")
    if mesh.get("data", 1) > 1 or mesh.get("fsdp", 1) == 1:
        devices = mesh.get("data", 1) * mesh.get("fsdp", 1)
        knobs.append(f"shard parameters and optimizer state over more devices: mesh={{'fsdp': {devices}, "
                     f"'tensor': {mesh.get('tensor', 1)}}} (now {mesh})")
    else:
        knobs.append(f"more devices on the fsdp axis (now {mesh}): a larger slice, or tensor parallelism for the "
                     "widest layers")
    if optimizer_bytes:
        knobs.append(f"a smaller optimizer state ({optimizer_bytes / GIB:.2f} GiB per device now): optim='adafactor', "
                     "or optimizers=(optax.adamw(..., mu_dtype=jnp.bfloat16), None)")
    if param_bytes:
        knobs.append(f"bf16 parameters (param_dtype=jnp.bfloat16; {param_bytes / GIB:.2f} GiB per device now)")
    return knobs
