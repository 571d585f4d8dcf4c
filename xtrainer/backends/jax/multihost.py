"""Joining a multi-host JAX run (jax.distributed) from the environment.

jax.distributed.initialize must run before anything touches a device, which in a script usually
means before the model is built. xtrainer therefore calls `initialize_from_env` when
TrainingArguments is created (scripts build their arguments first) and again when the backend is
prepared, where a late call gets an error that says what to move.

With enable_jit_checkpoint=True the preemption service is switched on when xtrainer initialises
jax.distributed, so a SIGTERM on any host makes every host save the same step (xtrainer/preemption.py).
Without it the service stays off: its SIGTERM handler would keep the process running, where transformers'
default (and xtrainer's on one host) is that SIGTERM ends it.

A process that dies (kill -9, a lost host) stops sending heartbeats to the coordination service;
after `jax_heartbeat_timeout` seconds (TrainingArguments, default 60; JAX's own default is 100)
JAX terminates every other process with "Terminating process because the JAX distributed service
detected fatal errors ... The following tasks are unhealthy (stopped sending heartbeats)", naming
the dead one, instead of leaving them blocked in a collective.

Host values that the processes must agree on (the outcome of each checkpoint save) go through the
coordination service's key-value store (`exchange`), which works from any thread and never
touches a device; keys live under a namespace per backend (`namespace`).
"""

from __future__ import annotations

import itertools
import json
import os
import time

import jax

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
# The k-th JAX backend prepared in a process: equal on every process of an SPMD program, so it
# names one backend's keys in the job-wide key-value store (keys outlive a Trainer).
_NAMESPACES = itertools.count()


def requested() -> bool:
    """True when the environment describes a multi-host run."""
    return bool(os.environ.get(ENV_ADDRESS))


def initialize_from_env(args=None) -> None:
    """Calls jax.distributed.initialize with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.

    On CPU the processes exchange collectives over gloo. A no-op when not requested or already done.
    `args.jax_heartbeat_timeout` (seconds) bounds how long the other processes outlive a dead one;
    `args.enable_jit_checkpoint` switches JAX's preemption service (which catches SIGTERM) on.
    """
    if not requested() or jax.distributed.is_initialized():
        return
    heartbeat = getattr(args, "jax_heartbeat_timeout", None) or DEFAULT_HEARTBEAT_TIMEOUT_S
    missing = [name for name in (ENV_COUNT, ENV_ID) if name not in os.environ]
    if missing:
        raise ValueError(f"{ENV_ADDRESS} is set but {', '.join(missing)} is not: set all three for a multi-host run.")
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if "jax_enable_preemption_service" in jax.config.values:
        # On: SIGTERM on any host -> every host stops at the same step (see xtrainer/preemption.py). Off unless
        # asked for, because the service's own SIGTERM handler swallows the signal (the process keeps running).
        jax.config.update("jax_enable_preemption_service", bool(getattr(args, "enable_jit_checkpoint", False)))
    try:
        jax.distributed.initialize(
            coordinator_address=os.environ[ENV_ADDRESS],
            num_processes=int(os.environ[ENV_COUNT]),
            process_id=int(os.environ[ENV_ID]),
            heartbeat_timeout_seconds=int(heartbeat),
        )
    except RuntimeError as exc:
        if "must be called before" in str(exc):
            raise RuntimeError(
                "A multi-host run was requested (JAX_COORDINATOR_ADDRESS is set) but JAX already started on one "
                "host: create TrainingArguments (or call jax.distributed.initialize()) before building the model "
                "or touching any JAX device."
            ) from exc
        raise


# The coordination-service key through which JAX's preemption sync manager learns of a preemption
# (its SIGTERM notifier writes it; every process watches it). Stable since the manager's first version.
_PREEMPTION_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"


def announce_preemption() -> None:
    """Posts the preemption notice that JAX's own SIGTERM notifier would post about a second later.

    xtrainer's SIGTERM handler replaces JAX's during train(); this keeps JAX's protocol (every
    process reports its step, the sync point is the fastest one's next step) and only removes the
    notifier's polling delay. A notice already posted by another process is fine.
    """
    import datetime

    death_time = datetime.datetime.now(datetime.timezone.utc).isoformat()  # RFC 3339, as JAX writes it
    try:
        _client().key_value_set(_PREEMPTION_NOTICE_KEY, death_time)
    except Exception as exc:  # noqa: BLE001
        if "already" not in str(exc).lower():
            raise


def preemption_service_running() -> bool:
    """Whether jax.distributed runs JAX's preemption sync manager (which catches SIGTERM itself)."""
    if not jax.distributed.is_initialized():
        return False
    from jax._src import distributed  # the manager is only reachable through JAX's global state

    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


def namespace() -> str:
    """A fresh key-value namespace for one backend (the same string on every process)."""
    return f"xtrainer/{next(_NAMESPACES)}"


def _client():
    from jax._src import distributed  # the key-value store is only reachable through JAX's global state

    return distributed.global_state.client


def exchange(key: str, value, timeout_s: float) -> list:
    """Every process's `value` (JSON-able), in process order, through the coordination service.

    Collective over processes but not over devices: it may run in a background thread while the
    step loop runs device collectives.

    Raises:
        TimeoutError (from JAX): a process did not post its value within timeout_s.
    """
    client = _client()
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
    timeout_ms = max(int(timeout_s * 1000), 1)
    return [json.loads(client.blocking_key_value_get(f"{key}/{index}", timeout_ms)) for index in range(jax.process_count())]


def forget(key: str) -> None:
    """Deletes the keys under `key` (once every process is known to have read them)."""
    _client().key_value_delete(key)


def failure_aware_barrier(watch: str, describe_failure):
    """A barrier for orbax (AsyncOptions.barrier_sync_fn) that also ends when a process posts a failure.

    Orbax's background save waits at barriers for every process; a process whose own write failed
    never arrives, and the others would wait out orbax's whole timeout. That process posts its
    failure under `watch` (an `exchange` key) instead, and this barrier raises at once on the others:
    `describe_failure(rank, report)` builds the exception.
    """
    def barrier(*, key: str, timeout_ms: int) -> None:
        client = _client()
        here = f"{watch}.barriers/{key}"
        client.key_value_set(f"{here}/{jax.process_index()}", "1")
        deadline = time.monotonic() + timeout_ms / 1000
        count = jax.process_count()
        while True:
            if len(client.key_value_dir_get(f"{here}/")) >= count:
                return
            for entry_key, report in client.key_value_dir_get(f"{watch}/"):
                value = json.loads(report)
                if value is not None:
                    raise describe_failure(int(entry_key.rsplit("/", 1)[-1]), value)
            if time.monotonic() > deadline:
                raise TimeoutError(f"Timed out after {timeout_ms / 1000:.0f}s waiting for every process at {key}.")
            time.sleep(0.01)

    return barrier
