"""Multi-host JAX through jax.distributed: 2 processes x 2 CPU devices on localhost == 1 process x 4 devices."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]), OMP_NUM_THREADS="1")
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    env.update(extra)
    return env


def _result(stdout: str) -> dict:
    return json.loads([l for l in stdout.splitlines() if l.startswith("RESULT=")][0][len("RESULT="):])


def _run_single(out, resume=False, **env):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(out), "4", "2", "1" if resume else "0"],
                          capture_output=True, text=True, env=_env(**env), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _result(proc.stdout)


def _run_two_processes(out, resume=False, **env):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(out), "2", "2", "1" if resume else "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i), **env),
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return _result(outputs[0][0])


@pytest.mark.distributed
def test_two_processes_match_one_process(tmp_path):
    """Also: with 2 data-loading workers per process, each process fetches only its own slice of every
    global batch (nothing is read and thrown away), and equals one process with no worker."""
    logs = {name: tmp_path / f"log-{name}" for name in ("single", "multi")}
    for path in logs.values():
        path.mkdir()
    single = _run_single(tmp_path / "single", MH_FETCH_LOG=str(logs["single"]), MH_WORKERS="0")
    multi = _run_two_processes(tmp_path / "multi", MH_FETCH_LOG=str(logs["multi"]), MH_WORKERS="2")
    assert multi["processes"] == 2 and multi["devices"] == 4 and single["devices"] == 4
    assert list(multi["losses"]) == [str(s) for s in range(1, 7)]
    np.testing.assert_allclose(list(multi["losses"].values()), list(single["losses"].values()), rtol=1e-5)
    for a, b in zip(multi["params"], single["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # TrainingArguments across hosts: main_process_first(local=False) made process 1 wait for process 0; with
    # log_on_each_node=False process 1 logs at log_level_replica ("info"), process 0 at log_level ("error").
    seen = [json.loads((tmp_path / f"multi.process{i}.json").read_text()) for i in range(2)]
    assert seen[1]["saw_marker"] and [s["level"] for s in seen] == [logging.ERROR, logging.INFO]
    assert [s["should_log"] for s in seen] == [True, False] and [s["should_save"] for s in seen] == [True, False]
    _check_each_process_read_its_shard(logs)
    # Checkpoints written by the two processes together resume (here: on two processes again).
    assert sorted(os.listdir(tmp_path / "multi")) == ["checkpoint-3", "checkpoint-6"]
    shutil.rmtree(tmp_path / "multi" / "checkpoint-6")
    (tmp_path / "log-resumed").mkdir()
    resumed = _run_two_processes(tmp_path / "multi", resume=True, MH_FETCH_LOG=str(tmp_path / "log-resumed"), MH_WORKERS="2")
    for a, b in zip(resumed["params"], multi["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _fetched(log_dir, process: str) -> list[int]:
    out = []
    for name in sorted(os.listdir(log_dir)):
        if name.startswith(f"fetched-{process}-"):
            with open(os.path.join(log_dir, name)) as f:
                out += [int(line) for line in f]
    return out


def _check_each_process_read_its_shard(logs) -> None:
    # Device prefetch reads two windows ahead, so each run reads 2 global batches beyond its 6 steps.
    everything = _fetched(logs["single"], "0")
    assert len(everything) == len(set(everything)) == 64
    first, second = _fetched(logs["multi"], "0"), _fetched(logs["multi"], "1")
    assert len(first) == len(set(first)) == len(second) == len(set(second)) == 32
    assert not set(first) & set(second)
    for step in range(8):  # process p's examples are the p-th half of each global batch of the single run
        batch = everything[8 * step: 8 * step + 8]
        assert set(batch[:4]) <= set(first) and set(batch[4:]) <= set(second)
    assert len({name.rsplit("-", 1)[1] for name in os.listdir(logs["multi"])}) == 4  # 2 workers per process
