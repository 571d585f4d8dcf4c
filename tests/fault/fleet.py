"""Client side of fleet_worker.py: starts the processes of a run (one fork server per rank), kills or
signals them, waits for them with a deadline, and reads what they left on disk."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "fleet_worker.py")
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """One `fleet_worker.py serve <backend>` process."""

    def __init__(self, backend: str):
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
        root = os.path.dirname(os.path.dirname(HERE))
        env["PYTHONPATH"] = os.pathsep.join([root, os.path.dirname(HERE), HERE])
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen([sys.executable, WORKER, "serve", backend], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        self.lock = threading.Lock()
        self.exited: dict[int, int] = {}
        self.import_s = self._read()["import_s"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fleet_worker server exited with {self.proc.wait()}")
        return json.loads(line)

    def call(self, **request) -> dict:
        with self.lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            answer = self._read()
        if "error" in answer:
            raise RuntimeError(f"fleet_worker server: {answer['error']} (request {request})")
        return answer

    def poll(self, pid: int):
        if pid not in self.exited:
            code = self.call(op="poll", pid=pid)["exit"]
            if code is None:
                return None
            self.exited[pid] = code  # reaped: never signal this pid again
        return self.exited[pid]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Run:
    """The processes of one run: pids by rank, and where they write."""

    def __init__(self, fleet: "Fleet", run_dir: str, pids: list[int]):
        self.fleet, self.run_dir, self.pids = fleet, run_dir, pids
        self.out_dir = os.path.join(run_dir, "out")

    def poll(self, rank: int):
        return self.fleet.servers[rank].poll(self.pids[rank])

    def alive(self) -> list[int]:
        return [r for r in range(len(self.pids)) if self.poll(r) is None]

    def signal(self, rank: int, sig: int) -> bool:
        """Sends sig to one rank unless it already exited; returns whether it was sent."""
        if self.poll(rank) is not None:
            return False
        os.kill(self.pids[rank], sig)
        return True

    def wait(self, timeout: float) -> list:
        """Exit codes by rank (None for a rank still running at the deadline, which is then killed)."""
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        codes = []
        for rank in range(len(self.pids)):
            code = self.poll(rank)
            if code is None:
                os.kill(self.pids[rank], signal.SIGKILL)
                while self.poll(rank) is None:
                    time.sleep(0.01)
            codes.append(code)
        return codes

    def exit_times(self) -> dict[int, float]:
        """When each rank that wrote a result ended (time.time())."""
        return {r: res["ended_at"] for r, res in self.results().items()}

    def progress(self, rank: int) -> list[tuple[int, float]]:
        try:
            with open(os.path.join(self.run_dir, f"progress-{rank}")) as f:
                return [(int(a), float(b)) for a, b in (line.split() for line in f if line.strip())]
        except FileNotFoundError:
            return []

    def steps_done(self) -> int:
        return max((p[-1][0] for p in (self.progress(r) for r in range(len(self.pids))) if p), default=0)

    def results(self) -> dict[int, dict]:
        out = {}
        for rank in range(len(self.pids)):
            path = os.path.join(self.run_dir, f"result-{rank}.json")
            if os.path.isfile(path):
                with open(path) as f:
                    out[rank] = json.load(f)
        return out

    def weights(self, rank: int = 0) -> dict[str, np.ndarray]:
        return dict(np.load(os.path.join(self.run_dir, f"weights-{rank}.npz")))

    def log(self, rank: int) -> str:
        try:
            with open(os.path.join(self.run_dir, f"log-{rank}")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def logs_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- rank {r} ---\n{self.log(r)[-chars:]}" for r in range(len(self.pids)))


class Fleet:
    """One fork server per rank for `backend`; `start` launches a run of `world` processes."""

    def __init__(self, backend: str, world: int):
        self.backend, self.world = backend, world
        self.servers = [_Server(backend) for _ in range(world)]

    def _env(self, rank: int, port: int) -> dict:
        if self.world == 1:
            return {}
        if self.backend == "torch":
            return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(self.world),
                    "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(self.world)}
        return {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(self.world),
                "JAX_PROCESS_ID": str(rank)}

    def start(self, run_dir: str, *, resume: bool = False, **options) -> Run:
        os.makedirs(run_dir, exist_ok=True)
        port = free_port()
        pids = [server.call(op="run", run_dir=run_dir, rank=rank, world=self.world, resume=resume,
                            env=self._env(rank, port), options=options)["pid"]
                for rank, server in enumerate(self.servers)]
        return Run(self, run_dir, pids)

    def close(self) -> None:
        for server in self.servers:
            server.close()


def wait_until(predicate, run: Run, timeout: float = 240.0, interval: float = 0.005) -> bool:
    """Checks predicate() until it holds; False when a process of the run exited first."""
    deadline = time.monotonic() + timeout
    next_poll = 0.0
    while not predicate():
        now = time.monotonic()
        if now >= next_poll:
            if len(run.alive()) < len(run.pids):
                return predicate()
            next_poll = now + 0.05
        if now > deadline:
            raise TimeoutError(f"no progress in {timeout:.0f}s:\n{run.logs_tail()}")
        time.sleep(interval)
    return True


def listing(out_dir: str) -> dict:
    """checkpoint-N/ (complete) and tmp-checkpoint-N/ (partial) directories present now."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    complete = sorted(int(n.split("-")[-1]) for n in names if n.startswith("checkpoint-") and n.split("-")[-1].isdigit())
    partial = sorted(n for n in names if n.startswith("tmp-checkpoint-"))
    return {"complete": complete, "partial": partial}


def loss_steps(history) -> dict[int, list[dict]]:
    steps: dict[int, list[dict]] = {}
    for entry in history or []:
        if "loss" in entry:
            steps.setdefault(entry["step"], []).append(entry)
    return steps


def compare_weights(backend: str, got: dict, want: dict) -> list[str]:
    """Bitwise on jax (CPU), within 1e-6 on torch; the differences found."""
    problems = []
    if got.keys() != want.keys():
        return [f"weight names differ: {sorted(got)} vs {sorted(want)}"]
    for name in sorted(want):
        diff = float(np.max(np.abs(got[name] - want[name]), initial=0.0))
        if backend == "jax" and not np.array_equal(got[name], want[name]):
            problems.append(f"{name} not bitwise equal (max diff {diff:.3g})")
        if backend == "torch" and not diff <= 1e-6:
            problems.append(f"{name} differs by {diff:.3g} > 1e-6")
    return problems


def compare_history(backend: str, got_history, want_history, max_steps: int) -> list[str]:
    """Every step 1..max_steps logged exactly once, with the reference's loss, learning rate, grad norm."""
    got, want = loss_steps(got_history), loss_steps(want_history)
    problems = []
    duplicated = sorted(s for s, entries in got.items() if len(entries) > 1)
    if duplicated or sorted(got) != list(range(1, max_steps + 1)):
        problems.append(f"log_history steps {sorted(got)} (duplicated: {duplicated}), expected 1..{max_steps} once each")
    for step in sorted(set(got) & set(want)):
        for key in ("loss", "learning_rate", "grad_norm"):
            a, b = got[step][0].get(key), want[step][0].get(key)
            if backend == "jax" or a is None or b is None:
                same = a == b
            else:
                same = abs(a - b) <= 1e-6 * max(abs(b), 1e-3)
            if not same:
                problems.append(f"{key} at step {step}: {a!r} vs reference {b!r}")
    return problems
