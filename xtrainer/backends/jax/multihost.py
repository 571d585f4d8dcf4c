"""Joining a multi-host JAX run (jax.distributed) from the environment.

jax.distributed.initialize must run before anything touches a device, which in a script usually
means before the model is built. xtrainer therefore calls `initialize_from_env` when
TrainingArguments is created (scripts build their arguments first) and again when the backend is
prepared, where a late call gets an error that says what to move.

With enable_jit_checkpoint=True the preemption service is switched on when xtrainer initialises
jax.distributed, so a SIGTERM on any host makes every host save the same step (xtrainer/preemption.py).
"""

from __future__ import annotations

import os

import jax

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def requested() -> bool:
    """True when the environment describes a multi-host run."""
    return bool(os.environ.get(ENV_ADDRESS))


def initialize_from_env(preemption: bool = True) -> None:
    """Calls jax.distributed.initialize with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.

    On CPU the processes exchange collectives over gloo. A no-op when not requested or already done.
    `preemption` (TrainingArguments.enable_jit_checkpoint) switches JAX's preemption service on or off:
    when on it catches SIGTERM, so it must be off when nothing saves and exits on SIGTERM.
    """
    if not requested() or jax.distributed.is_initialized():
        return
    missing = [name for name in (ENV_COUNT, ENV_ID) if name not in os.environ]
    if missing:
        raise ValueError(f"{ENV_ADDRESS} is set but {', '.join(missing)} is not: set all three for a multi-host run.")
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if "jax_enable_preemption_service" in jax.config.values:
        # SIGTERM on any host -> every host stops at the same step (see xtrainer/preemption.py).
        jax.config.update("jax_enable_preemption_service", bool(preemption))
    try:
        jax.distributed.initialize(
            coordinator_address=os.environ[ENV_ADDRESS],
            num_processes=int(os.environ[ENV_COUNT]),
            process_id=int(os.environ[ENV_ID]),
        )
    except RuntimeError as exc:
        if "must be called before" in str(exc):
            raise RuntimeError(
                "A multi-host run was requested (JAX_COORDINATOR_ADDRESS is set) but JAX already started on one "
                "host: create TrainingArguments (or call jax.distributed.initialize()) before building the model "
                "or touching any JAX device."
            ) from exc
        raise


def preemption_service_running() -> bool:
    """Whether jax.distributed runs JAX's preemption sync manager (which catches SIGTERM itself)."""
    if not jax.distributed.is_initialized():
        return False
    from jax._src import distributed  # the manager is only reachable through JAX's global state

    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None
