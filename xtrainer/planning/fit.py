"""auto_find_batch_size on the JAX backend: compile the train step, and if it does not fit, find the
largest per-device batch whose step does, by compiling (never running) smaller ones.

A step does not fit when XLA reports RESOURCE_EXHAUSTED while compiling it (XLA:TPU does), or when
its `memory_analysis()` needs more than the device's memory (`memory.device_memory_limit`:
$XTRAINER_DEVICE_MEMORY_BYTES, else what TPU and GPU runtimes report; CPU reports none). This is
the same judgement `xtrainer plan` makes against a preset's HBM.
"""

from __future__ import annotations

import jax

from .abstract import _Shaped
from .memory import GIB, StepDoesNotFit, StepMemory, device_memory_limit, is_resource_exhausted


def compile_within_memory(backend, jitted, state, arrays: dict, mask, num_items, compiler_options=None):
    """The compiled step for these arrays; StepDoesNotFit (with `largest_batch` set when one fits) if it does not fit."""
    limit = device_memory_limit(list(backend.mesh.devices.flat))
    batch_devices = backend.mesh_config.batch_devices

    def attempt(window):
        try:
            compiled = jitted.lower(state, window, mask, num_items).compile(compiler_options=compiler_options)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory means "does not fit"
            if not is_resource_exhausted(exc):
                raise
            return None, None
        memory = StepMemory.of(compiled)
        return (compiled if limit is None or memory.total <= limit else None), memory

    compiled, memory = attempt(arrays)
    if compiled is not None:
        return compiled
    rows = next(iter(arrays.values())).shape[1]
    per_device = max(rows // batch_devices, 1)

    def fits(batch: int) -> bool:
        window = {}
        for name, array in arrays.items():
            shape = array.shape[:1] + (batch * batch_devices,) + array.shape[2:]
            window[name] = jax.ShapeDtypeStruct(shape, array.dtype, sharding=backend._batch_sharding(_Shaped(shape), 1))
        return attempt(window)[0] is not None

    low, high = 0, per_device  # the largest batch known to fit (0: none), the smallest known not to
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    needed = memory.total if memory is not None else None
    raise StepDoesNotFit(
        f"The JAX train step at per_device_train_batch_size={per_device} does not fit in device memory"
        + (f" ({needed / GIB:.2f} GiB needed, {limit / GIB:.2f} GiB available)" if needed and limit else "")
        + (f"; per_device_train_batch_size={low} fits." if low else "; not even a batch of 1 fits."),
        needed=needed, available=limit, largest_batch=low or None,
    )
