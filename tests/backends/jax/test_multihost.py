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


def _run_single(out, resume=False):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(out), "4", "2", "1" if resume else "0"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _result(proc.stdout)


def _run_two_processes(out, resume=False):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(out), "2", "2", "1" if resume else "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
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
    single = _run_single(tmp_path / "single")
    multi = _run_two_processes(tmp_path / "multi")
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
    # Checkpoints written by the two processes together resume (here: on two processes again).
    assert sorted(os.listdir(tmp_path / "multi")) == ["checkpoint-3", "checkpoint-6"]
    shutil.rmtree(tmp_path / "multi" / "checkpoint-6")
    resumed = _run_two_processes(tmp_path / "multi", resume=True)
    for a, b in zip(resumed["params"], multi["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
