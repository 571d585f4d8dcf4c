"""SIGTERM during training: the step finishes, its checkpoint is saved and verifies, exit code 143,
and resuming it ends with the weights of an uninterrupted run (torch and jax, in a subprocess)."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import sigterm_worker
import xtrainer
from xtrainer import preemption
from xtrainer.manifest import Verdict, verify_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(HERE), HERE]), OMP_NUM_THREADS="1")
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    env.update(extra)
    return env


def _start(backend, out, **env):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "sigterm_worker.py"), backend, str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env))


def _wait_for(paths, procs, timeout=240):
    deadline = time.time() + timeout
    while not all(os.path.exists(p) for p in paths):
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"worker exited early ({p.returncode}): {p.communicate()[1][-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {paths}")
        time.sleep(0.05)


def _interrupt(procs, out, signalled):
    _wait_for([out / f"ready-{i}" for i in range(len(procs))], procs)
    procs[signalled].send_signal(signal.SIGTERM)
    (out / "sent").touch()
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=240)
            results.append((p.returncode, err))
    finally:
        for p in procs:
            p.kill()
    return results


def _saved_step(stderr: str) -> int:
    match = re.search(r"Received SIGTERM at step (\d+); saved checkpoint-(\d+) \(.*\); resume with "
                      r"resume_from_checkpoint=True", stderr)
    assert match, stderr[-3000:]
    assert match.group(1) == match.group(2)
    return int(match.group(1))


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_sigterm_saves_exits_143_and_resumes_exactly(tmp_path, backend):
    out = tmp_path / "run"
    out.mkdir()
    [(code, err)] = _interrupt([_start(backend, out)], out, 0)
    assert code == preemption.PREEMPTION_EXIT_CODE == 143, err[-3000:]
    step = _saved_step(err)
    assert step == sigterm_worker.PAUSE_STEP  # the step running when SIGTERM came, not the next save_steps
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == [f"checkpoint-{step}"]
    assert verify_checkpoint(str(out / f"checkpoint-{step}")) is Verdict.VERIFIED

    resumed = sigterm_worker.make_trainer(backend, str(out))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == sigterm_worker.MAX_STEPS
    full = sigterm_worker.make_trainer(backend, str(tmp_path / "full"))
    full.train()
    for a, b in zip(sigterm_worker.weights(resumed, backend), sigterm_worker.weights(full, backend)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_handler_is_restored_and_only_sets_a_flag(tmp_path):
    """In-process: train() puts its handler in place only while it runs; afterwards the old one is back."""
    seen = []

    def previous(signum, frame):
        seen.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        trainer = sigterm_worker.make_trainer("torch", str(tmp_path / "run"))
        handlers = []

        class Probe(xtrainer.TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                handlers.append(signal.getsignal(signal.SIGTERM))

        trainer.add_callback(Probe())
        trainer.train()
        assert handlers and all(getattr(h, "__self__", None).__class__ is preemption.PreemptionWatcher for h in handlers)
        assert signal.getsignal(signal.SIGTERM) is previous
        with pytest.raises(preemption.TrainingPreempted) as info:  # a signal in the middle of a run
            trainer2 = sigterm_worker.make_trainer("torch", str(tmp_path / "run2"))

            class Kill(xtrainer.TrainerCallback):
                def on_step_begin(self, args, state, control, **kwargs):
                    if state.global_step == 3:
                        os.kill(os.getpid(), signal.SIGTERM)

            trainer2.add_callback(Kill())
            trainer2.train()
        assert info.value.code == 143 and info.value.step == 4 and info.value.checkpoint.endswith("checkpoint-4")
        assert seen == [] and signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigterm_at_a_save_step_saves_once(tmp_path):
    saves = []

    class Record(xtrainer.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == sigterm_worker.SAVE_STEPS - 1:
                os.kill(os.getpid(), signal.SIGTERM)  # during the step that save_steps saves anyway

        def on_save(self, args, state, control, **kwargs):
            saves.append(state.global_step)

    trainer = sigterm_worker.make_trainer("torch", str(tmp_path / "run"), [Record()])
    with pytest.raises(preemption.TrainingPreempted) as info:
        trainer.train()
    assert info.value.step == sigterm_worker.SAVE_STEPS and saves == [sigterm_worker.SAVE_STEPS]
    assert verify_checkpoint(info.value.checkpoint) is Verdict.VERIFIED


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_jax_processes_save_the_same_step(tmp_path):
    """SIGTERM to one of two jax.distributed processes: JAX's preemption sync point stops both at one step."""
    out = tmp_path / "run"
    out.mkdir()
    port = _free_port()
    env = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [_start("jax", out, JAX_PROCESS_ID=str(i), **env) for i in range(2)]
    results = _interrupt(procs, out, signalled=1)
    for code, err in results:
        assert code == 143, err[-3000:]
    steps = {_saved_step(err) for _, err in results}
    assert len(steps) == 1
    step = steps.pop()
    assert sigterm_worker.PAUSE_STEP <= step < sigterm_worker.MAX_STEPS
    assert verify_checkpoint(str(out / f"checkpoint-{step}")) is Verdict.VERIFIED
