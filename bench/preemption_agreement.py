"""Per-step cost of the preemption agreement of a multi-process run (2 processes on this machine).

torch (gloo): `coordination.PreemptionAgreement.at_step`, the non-blocking all-reduce of the
SIGTERM flag that xtrainer runs after every optimizer step, against a blocking all-reduce of the
same flag (what a naive agreement would do) and against nothing. Each variant runs CALLS times
inside a loop whose "step" lasts STEP_MS: the host sleeping (as while an accelerator computes), or
with --host-busy a busy loop (a CPU-bound step: on this 2-core machine the two processes then
leave gloo no idle core). Timed two ways: host time inside the call (median and 99th percentile),
and the whole loop's time per step minus the loop without any agreement.

jax (jax.distributed, the preemption service on): `multihost_utils.reached_preemption_sync_point`,
what the JAX backend calls after every step, timed the same way.

    PYTHONPATH=. <main-lane python> bench/preemption_agreement.py [--calls 2000] [--step-ms 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


def _idle(ms: float) -> None:
    time.sleep(ms / 1000)


STEP = _idle


def _loop(call, calls: int, step_ms: float) -> dict:
    inside = []
    for _ in range(50):  # warm-up
        call()
    start = time.perf_counter()
    for _ in range(calls):
        STEP(step_ms)
        t0 = time.perf_counter()
        call()
        inside.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    inside.sort()
    return {"per_step_ms": total / calls * 1000, "call_median_us": inside[len(inside) // 2] * 1e6,
            "call_p99_us": inside[int(len(inside) * 0.99)] * 1e6}


def torch_child(calls: int, step_ms: float) -> dict:
    import torch
    import torch.distributed as dist

    from xtrainer.backends.torch import coordination

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    groups = coordination.HostGroups(600)
    agreement = coordination.PreemptionAgreement(groups.preemption)

    def blocking():
        flag = torch.zeros(1, dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=groups.preemption)
        return bool(flag.item())

    out = {}
    for name, call in (("none", lambda: False), ("xtrainer (async all-reduce, read one step late)",
                                                 lambda: agreement.at_step(False)),
                       ("blocking all-reduce", blocking), ("none (again)", lambda: False)):
        dist.barrier()
        out[name] = _loop(call, calls, step_ms)
    agreement.at_end()
    dist.destroy_process_group()
    return out


def jax_child(calls: int, step_ms: float) -> dict:
    import jax

    jax.config.update("jax_enable_preemption_service", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
    from jax.experimental import multihost_utils

    counter = iter(range(1, 10**9))
    out = {}
    for name, call in (("none", lambda: False),
                       ("reached_preemption_sync_point", lambda: multihost_utils.reached_preemption_sync_point(next(counter))),
                       ("none (again)", lambda: False)):
        multihost_utils.sync_global_devices(name)
        out[name] = _loop(call, calls, step_ms)
    return out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(backend: str, calls: int, step_ms: float) -> dict:
    port = _port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        if backend == "torch":
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
        else:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank),
                       JAX_PLATFORMS="cpu")
        procs.append(subprocess.Popen([sys.executable, __file__, "--child", backend, "--calls", str(calls),
                                       "--step-ms", str(step_ms)] + (["--host-busy"] if STEP is _busy else []), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(err[-3000:])
    return json.loads([l for l in outs[0][0].splitlines() if l.startswith("RESULT=")][0][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--step-ms", type=float, default=2.0)
    parser.add_argument("--backends", default="torch,jax")
    parser.add_argument("--host-busy", action="store_true", help="the step is a busy loop instead of a sleep")
    parser.add_argument("--child")
    opts = parser.parse_args()
    global STEP
    STEP = _busy if opts.host_busy else _idle
    if opts.child:
        fn = torch_child if opts.child == "torch" else jax_child
        print("RESULT=" + json.dumps(fn(opts.calls, opts.step_ms)), flush=True)
        return
    what = "host work (busy loop)" if opts.host_busy else "host idle (sleep)"
    print(f"2 processes, {opts.calls} steps of {opts.step_ms} ms {what} each; process 0's figures:")
    print("| backend | agreement | host time in the call, median (us) | p99 (us) | ms per step | cost per step vs none (us) |")
    print("|---|---|---:|---:|---:|---:|")
    for backend in opts.backends.split(","):
        result = launch(backend, opts.calls, opts.step_ms)
        base = min(result["none"]["per_step_ms"], result["none (again)"]["per_step_ms"])
        for name, r in result.items():
            if name.startswith("none"):
                continue
            print(f"| {backend} | {name} | {r['call_median_us']:.1f} | {r['call_p99_us']:.1f} | {r['per_step_ms']:.3f} "
                  f"| {(r['per_step_ms'] - base) * 1000:.1f} |")
        print(f"| {backend} | none (best of two runs) | - | - | {base:.3f} | 0 |")


if __name__ == "__main__":
    main()
