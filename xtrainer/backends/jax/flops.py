"""FLOPs of a compiled JAX train step and the peak FLOP/s of the devices it runs on (for MFU).

XLA's cost analysis of an SPMD-partitioned executable counts the FLOPs of one partition (one
device), and counts the body of a `while` loop (our `lax.scan` over accumulation micro-batches)
once, whatever its trip count. `step_flops` corrects both: it multiplies by the number of devices
and, when this XLA counts loop bodies once (probed once per process on a tiny scan), by the
accumulation count. That correction also multiplies the optimizer update, which runs once per
step outside the loop; its O(params) FLOPs are under 1% of a micro-batch's 6·params·tokens once
a micro-batch holds more than ~100 tokens.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from ...throughput import best_matmul_flops, device_peak_flops

logger = logging.getLogger(__name__)


def _cost_flops(compiled) -> float | None:
    try:
        analysis = compiled.cost_analysis()
    except Exception as exc:  # some PJRT plugins do not implement it
        logger.info("No cost analysis for the compiled step (%s): no MFU in the logs.", exc)
        return None
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per executable
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


@functools.cache
def scan_body_counted_once() -> bool:
    """Whether this XLA's cost analysis counts a scanned loop body once instead of per iteration."""

    def run(x):
        return jax.lax.scan(lambda c, xi: (c + jnp.sum(xi @ xi), None), 0.0, x)[0]

    one = _cost_flops(jax.jit(run).lower(jnp.ones((1, 32, 32))).compile())
    four = _cost_flops(jax.jit(run).lower(jnp.ones((4, 32, 32))).compile())
    if not one or not four:
        return False
    return four < 2 * one


def step_flops(compiled, accumulation_steps: int, num_devices: int) -> float | None:
    """FLOPs of one optimizer step on all devices together, from the compiled step's cost analysis."""
    flops = _cost_flops(compiled)
    if flops is None:
        return None
    if accumulation_steps > 1 and scan_body_counted_once():
        flops *= accumulation_steps
    return flops * num_devices


def peak_flops(devices) -> float | None:
    """Peak FLOP/s of these devices together (see xtrainer.throughput for where the figure comes from).

    Fake CPU devices (`--xla_force_host_platform_device_count`) share the host's cores, so on CPU the
    measured host figure is the peak of all of them together, not of each.
    """
    devices = list(devices)
    first = devices[0]
    per_device = device_peak_flops(getattr(first, "device_kind", ""), first.platform,
                                   measure=lambda: xla_matmul_peak_flops(first))
    if per_device is None:
        return None
    return per_device if first.platform == "cpu" else per_device * len(devices)


_MEASURED: dict = {}


def xla_matmul_peak_flops(device) -> float:
    """FLOP/s of XLA's own matmul on this device, the best over float32 and bfloat16 and two sizes,
    measured once per process: the CPU stand-in for a datasheet peak (the step runs on the same kernels)."""
    key = (device.platform, device.id)
    if key not in _MEASURED:
        best = 0.0
        for dtype in (jnp.float32, jnp.bfloat16):
            for size in (512, 1024):
                a = jax.device_put(jnp.ones((size, size), dtype), device)
                matmul = jax.jit(lambda x, y: x @ y)
                best = max(best, best_matmul_flops(lambda: matmul(a, a).block_until_ready(), size))
        _MEASURED[key] = best
    return _MEASURED[key]
