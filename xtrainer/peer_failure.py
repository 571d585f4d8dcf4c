"""One process of a multi-process run died or stopped answering: the others stop with a clear error.

The collectives of a training step (DDP's all-reduce, FSDP's gathers, the save agreement) fail on
the surviving processes as soon as a peer's connection closes (gloo notices a killed process at
once), or after `ddp_timeout` seconds for a peer that hangs. What they raise is the communication
library's message (for example gloo's "Connection closed by peer"); `train()` turns it into a
`PeerProcessFailure` that says what happened, at which step, and what to do.

Multi-host JAX is stopped by JAX itself: its coordination service terminates every process
`jax_heartbeat_timeout` seconds after one stopped sending heartbeats (backends/jax/multihost.py).
"""

from __future__ import annotations

import os

# Messages of the communication libraries when a peer is gone (gloo, NCCL, torch.distributed's
# store, JAX's coordination service).
_SIGNS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "connection refused",
    "timed out waiting",
    "socket timeout",
    "nccl communicator was aborted",
    "watchdog caught collective operation timeout",
    "stopped sending heartbeats",
    "socket closed",
    "failed to send rpc to coordination service",
    "detected fatal errors",
    "failed to recv",
    "failed to send",
)
_DIST_ERRORS = {"DistBackendError", "DistNetworkError", "DistStoreError"}


class PeerProcessFailure(RuntimeError):
    """Another process of this run died, was killed, or stopped answering; this one stopped too.

    Attributes:
        step: the global step this process had reached.
        rank: this process's index.
    """

    def __init__(self, message: str, *, step: int, rank: int):
        super().__init__(message)
        self.step, self.rank = step, rank


def is_peer_failure(exc: BaseException) -> bool:
    """Whether exc (or an exception it wraps) is a collective failing because another process is gone."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, PeerProcessFailure) or type(exc).__name__ in _DIST_ERRORS:
            return True
        text = str(exc).lower()
        if any(sign in text for sign in _SIGNS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def peer_failure_error(exc: BaseException, *, rank: int, processes: int, step: int, output_dir: str) -> PeerProcessFailure:
    """The error a surviving process raises, naming the step, the newest complete checkpoint and the fix."""
    from .trainer_utils import sorted_checkpoints

    cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    checkpoints = sorted_checkpoints(output_dir)
    newest = f"the newest complete checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was published yet"
    return PeerProcessFailure(
        f"Another process of this {processes}-process run stopped (it crashed, was killed, or lost its connection) "
        f"while process {rank} was at step {step}; process {rank} (pid {os.getpid()}) stops as well. No partial "
        f"checkpoint is published; {newest}. Restart all {processes} processes with resume_from_checkpoint=True. "
        f"(The communication library said: {cause})",
        step=step, rank=rank,
    )


__all__ = ["PeerProcessFailure", "is_peer_failure", "peer_failure_error"]
