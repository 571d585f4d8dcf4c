"""Host-side agreement between the processes of a torch.distributed run, off the training collectives.

Two gloo process groups of their own, created once per run on every process (only with more than
one process), carry small host values and never touch the accelerator:

- the *preemption* group: one asynchronous all-reduce (MAX) of this process's SIGTERM flag per
  optimizer step. The reduction launched at the end of step N is read at the end of step N+1, so
  the host never waits for it (its latency hides behind a step) and every process reads the same
  value at the same step: a SIGTERM on any one rank at step N makes every rank save step N+1.
- the *checkpoint* group: the outcome exchange of each save (checkpoint_writer.py), which may run
  in a background thread while the step loop uses the default group; and, for asynchronous FSDP
  saves, dcp.async_save's own collectives (never at the same time: a save waits for the previous).

Both groups time out after `ddp_timeout` seconds (transformers' field: the bound on every wait for
another process); a process that died is noticed at once, gloo sees its connection close.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


class HostGroups:
    """The two gloo groups (see the module docstring); construction is collective."""

    def __init__(self, timeout_s: float):
        timeout = datetime.timedelta(seconds=timeout_s)
        self.preemption = dist.new_group(backend="gloo", timeout=timeout)
        self.checkpoint = dist.new_group(backend="gloo", timeout=timeout)


class PreemptionAgreement:
    """All processes agree, one step late and without waiting, whether any of them got SIGTERM."""

    def __init__(self, group):
        self.group = group
        self._pending = None  # (work, flag tensor) of the reduction launched at the last step

    def _read_pending(self) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        work.wait()
        return bool(flag.item())  # a CPU tensor: no accelerator sync

    def at_step(self, local_flag: bool) -> bool:
        """At the end of an optimizer step: True when the reduction of the previous step saw a SIGTERM.

        Launches this step's reduction unless the answer is already yes (then every process
        stops here, and none launches one).
        """
        agreed = self._read_pending()
        if not agreed:
            flag = torch.tensor([1 if local_flag else 0], dtype=torch.int32)
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
            self._pending = (work, flag)
        return agreed

    def at_end(self) -> bool:
        """After the last step: the result of the last reduction (a SIGTERM during the last step)."""
        return self._read_pending()


def exchange(value, group, world_size: int) -> list:
    """Every process's `value` (small, picklable), in rank order; collective on `group`."""
    out = [None] * world_size
    dist.all_gather_object(out, value, group=group)
    return out
