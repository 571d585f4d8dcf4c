"""enable_jit_checkpoint off (the default): in a multi-host JAX run SIGTERM still ends the process, as in
transformers. JAX's preemption service, which xtrainer switches on only with enable_jit_checkpoint=True, would
catch the signal and keep the process running."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = textwrap.dedent("""
    import os, signal, sys, time
    import xtrainer
    import jax
    args = xtrainer.TrainingArguments(sys.argv[1], backend="jax", report_to="none",
                                      enable_jit_checkpoint=sys.argv[2] == "1")  # joins jax.distributed
    assert jax.distributed.is_initialized()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(2)
    print("still running", flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("enabled", [False, True], ids=["default", "enable_jit_checkpoint"])
def test_sigterm_outside_train_on_a_multi_host_jax_run(tmp_path, enabled):
    if importlib.util.find_spec("flax") is None:
        pytest.skip("the jax backend is not installed")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="1",
               JAX_PROCESS_ID="0", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path), "1" if enabled else "0"], env=env,
                          capture_output=True, text=True, timeout=120)
    if enabled:
        # The service holds the signal for the step loop (xtrainer/preemption.py), which is not running here.
        assert proc.returncode == 0 and "still running" in proc.stdout, proc.stderr[-2000:]
    else:
        assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stdout, proc.stderr[-2000:])
