"""Training throughput in the logs: tokens per second and model FLOPs utilisation (MFU).

Definitions (the numbers the `tokens_per_second` and `mfu` log keys carry):

- **tokens**: per micro-batch, the sum of `attention_mask` when the batch has one (real tokens,
  padding excluded), else the number of `input_ids` elements. Batches with neither count 0 tokens,
  and then no `tokens_per_second` is logged. Counted on the host from the numpy batches the loop
  already holds, so it costs no device synchronisation.
- **tokens_per_second**: tokens of the optimizer steps since the previous log, divided by the
  training wall time since the previous log (time spent in evaluation and checkpoint saving in
  between is excluded). The clock is read when the log is written, after the loss has been
  fetched from the device, so asynchronous dispatch does not inflate it.
- **mfu**: FLOPs of those steps (the backend's `step_flops()`, all devices together) divided by
  the same wall time and by the peak FLOP/s of all devices (`peak_flops()`). The peak comes from
  `XTRAINER_PEAK_FLOPS` (FLOP/s of one device) when set, else the table below for accelerators,
  else, on CPU, a matmul measured once per process with the library that runs the step (an XLA
  matmul on the JAX and torch_xla backends); a backend that cannot measure logs no `mfu`.
  An `mfu` above 1 is impossible, so it is never logged: it means the peak figure is wrong, and a
  warning says so once.

Why the CPU peak is measured with the step's own library: the demo once logged `mfu` of 1.0 to
6.9 on CPU. Its FLOP count was right (XLA's count of the compiled step); the peak was a 512 x 512
numpy matmul, whose OpenBLAS kernel (picked by OPENBLAS_CORETYPE and the CPU it detects) and thread
pool ran at 3-14 GFLOP/s on these shared 2-core machines while XLA's own matmul ran the step's math
at 20-140 GFLOP/s. A peak measured with one library does not bound a step run by another.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Mapping

import numpy as np

logger = logging.getLogger(__name__)

PEAK_FLOPS_ENV = "XTRAINER_PEAK_FLOPS"

# Dense bf16 peak FLOP/s of one device (one chip; for v4/v5p one chip = 2 TensorCores seen as one
# JAX device). Matched as lower-case substrings of the device kind, most specific first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    # TPU: https://cloud.google.com/tpu/docs/v6e, /v5p, /v5e, /v4 ("Peak compute per chip").
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5lite", 197e12),  # torch_xla's accelerator type "v5litepod-N"
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports itself as "TPU v5"
    ("tpu v4", 275e12),
    # NVIDIA datasheets (dense, i.e. without 2:4 sparsity):
    # https://www.nvidia.com/en-us/data-center/h200/, /h100/, /a100/
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("a100", 312e12),
)


def peak_flops_for_device_kind(kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this kind (e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3").

    Returns None for a kind the table does not know.
    """
    lowered = kind.lower()
    for key, flops in PEAK_BF16_FLOPS:
        if key in lowered:
            return flops
    return None


def peak_flops_override() -> float | None:
    """Per-device peak FLOP/s from the XTRAINER_PEAK_FLOPS environment variable, if set."""
    value = os.environ.get(PEAK_FLOPS_ENV)
    if not value:
        return None
    try:
        flops = float(value)
    except ValueError as exc:
        raise ValueError(f"{PEAK_FLOPS_ENV}={value!r} is not a number of FLOP/s (e.g. 1e12).") from exc
    if flops <= 0:
        raise ValueError(f"{PEAK_FLOPS_ENV} must be positive, got {value!r}.")
    return flops


def best_matmul_flops(run_matmul, size: int, repeats: int = 7) -> float:
    """FLOP/s of the fastest of `repeats` calls of `run_matmul()`, which multiplies two size x size
    matrices and waits for the result (after one warm-up call: compilation, thread pools, page faults)."""
    run_matmul()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run_matmul()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / max(best, 1e-9)


def device_peak_flops(kind: str | None, platform: str, measure=None) -> float | None:
    """Peak FLOP/s of one device: the env override, else the table, else (CPU only) `measure()`.

    `measure` is the backend's own measurement on CPU, with the library that runs its steps; without
    one the CPU peak is unknown (None: no mfu is logged).
    """
    override = peak_flops_override()
    if override is not None:
        return override
    if kind:
        known = peak_flops_for_device_kind(kind)
        if known is not None:
            return known
    if platform.lower() == "cpu" and measure is not None:
        return measure()
    return None


def analytic_train_flops(num_params: int, tokens: int, seq_len: int = 0, num_layers: int = 0, hidden_size: int = 0) -> float:
    """Model FLOPs of one forward+backward pass over `tokens` tokens (PaLM, appendix B).

    6·N per token for the weight matmuls (2 forward, 4 backward) plus 12·layers·hidden·seq per token
    for the attention score and value matmuls. Pass num_layers=0 for a model without attention.
    """
    return 6.0 * num_params * tokens + 12.0 * num_layers * hidden_size * seq_len * tokens


def count_tokens(batch: Mapping) -> int:
    """Tokens of one host micro-batch: attention_mask sum if present, else input_ids elements, else 0."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(np.asarray(mask).sum())
    ids = batch.get("input_ids")
    if ids is not None:
        return int(np.asarray(ids).size)
    return 0


class ThroughputMeter:
    """Accumulates tokens and steps between logs; `report()` turns them into log fields.

    Args:
        backend: the Trainer's backend; its optional `step_flops()` / `peak_flops()` give the MFU.
        clock: the time source (injectable for tests).
    """

    def __init__(self, backend, clock=time.perf_counter):
        self.backend = backend
        self.clock = clock
        self.tokens = 0
        self.steps = 0
        self.excluded = 0.0
        self.since = clock()
        self._warned_mfu = False

    def add(self, window: Iterable[Mapping]) -> None:
        """Counts one optimizer step over this accumulation window of host batches."""
        self.tokens += sum(count_tokens(batch) for batch in window)
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        """Leaves the time spent inside (evaluation, checkpoint saving) out of the throughput."""
        start = self.clock()
        try:
            yield
        finally:
            self.excluded += self.clock() - start

    def report(self) -> dict[str, float]:
        """{"tokens_per_second", "mfu"} for the steps since the last report (each only when known)."""
        now = self.clock()
        elapsed = now - self.since - self.excluded
        tokens, steps = self.tokens, self.steps
        self.tokens, self.steps, self.excluded, self.since = 0, 0, 0.0, now
        if elapsed <= 0 or steps == 0:
            return {}
        fields: dict[str, float] = {}
        if tokens:
            fields["tokens_per_second"] = round(tokens / elapsed, 3)
        step_flops = _optional_call(self.backend, "step_flops")
        peak = _optional_call(self.backend, "peak_flops")
        if step_flops and peak:
            mfu = step_flops * steps / elapsed / peak
            if mfu <= 1.0:
                fields["mfu"] = mfu
            elif not self._warned_mfu:
                self._warned_mfu = True
                logger.warning(
                    "Not logging mfu: it came out at %.2f, above 1, so the peak of %.3g FLOP/s is too low for these "
                    "devices (on CPU: measured while other processes used the cores). Set %s to the devices' real "
                    "peak FLOP/s per device.", mfu, peak, PEAK_FLOPS_ENV)
        return fields


def _optional_call(backend, name: str) -> float | None:
    method = getattr(backend, name, None)
    return method() if callable(method) else None
