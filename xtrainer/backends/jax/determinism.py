"""TrainingArguments.full_determinism on the JAX backend: XLA's deterministic-execution options.

With the same seed, a JAX program is already deterministic on CPU and TPU. On GPU two sources of
run-to-run differences remain, and XLA's `xla_gpu_deterministic_ops` removes both: kernels that
accumulate with atomics (scatter-add, some reductions) are replaced by deterministic ones, and the
autotuner stops choosing conv/GEMM algorithms by timing, which could pick different kernels, hence
different rounding, in two runs. (It implies `xla_gpu_exclude_nondeterministic_ops`.)

The options reach XLA in two ways, because they can only take effect at two moments:

1. `XLA_FLAGS` is read once per process, when JAX starts its backend (the first device use). Set
   then, the options cover every computation of the process: model initialisation, eager ops, the
   user's own jitted functions. `request_process_flags` adds them when TrainingArguments is created
   (scripts create it before building the model), unless JAX has already started; then a GPU run
   logs that only the Trainer's steps are covered, and where to create the arguments instead.
2. Every step the JAX backend compiles (train, eval) passes them as per-compilation options
   (`compiler_options`), which apply whenever the Trainer is built.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

#: DebugOptions fields (the per-compilation spelling of the XLA_FLAGS below).
DETERMINISTIC_OPTIONS = {"xla_gpu_deterministic_ops": True}
PROCESS_FLAGS = ("--xla_gpu_deterministic_ops=true",)


def compiler_options(args) -> dict | None:
    """The per-compilation XLA options of the backend's steps: deterministic ones under full_determinism."""
    return dict(DETERMINISTIC_OPTIONS) if getattr(args, "full_determinism", False) else None


def _jax_started() -> bool:
    if "jax" not in sys.modules:  # not even imported: its backends cannot have started
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def request_process_flags() -> bool:
    """Adds the deterministic flags to XLA_FLAGS if JAX has not started yet; returns whether it could.

    Too late (JAX already runs), a GPU run logs a warning: only the Trainer's compiled steps are then
    deterministic. On CPU and TPU there is nothing to warn about: XLA runs deterministically there.
    """
    if _jax_started():
        import jax

        if jax.default_backend() == "gpu":
            logger.warning(
                "full_determinism=True: JAX had already started when TrainingArguments was created, so XLA_FLAGS "
                "(%s) no longer reaches computations outside the Trainer (model initialisation, your own jitted "
                "functions); the Trainer's train and eval steps are still compiled deterministically. Create "
                "TrainingArguments before running anything on a JAX device to cover the whole process.",
                " ".join(PROCESS_FLAGS),
            )
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    missing = [flag for flag in PROCESS_FLAGS if flag.split("=")[0] not in flags]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()
    return True
