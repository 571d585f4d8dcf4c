"""Multi-process training through torch.distributed: torchrun, 2 processes, gloo on CPU.

Two processes with per-device batch 2 must train exactly like one process with batch 4 (data.BatchPlan
gives the processes the two halves of each global micro-batch; gradients are averaged), under DDP
and under FSDP2 (`fsdp="full_shard"`). Their checkpoints must resume to the same weights as the
uninterrupted run, also across topologies (one process <-> FSDP2).

A torchrun launch (dist_worker.py) costs ~20 s of interpreter start-up on a 2-core machine, so one
launch runs DDP and then FSDP2 for all the tests (module-scoped fixtures); the DDP tests still
report their own results when the FSDP2 part fails. The one-process reference runs in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
    ),
]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
LAUNCH_TIMEOUT_S = 300

# The worker doubles as the library of the one-process runs (same model, data and arguments).
_spec = importlib.util.spec_from_file_location("xtrainer_dist_worker", HERE / "dist_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

CKPT_MID = f"checkpoint-{worker.SAVE_STEPS}"


# ------------------------------------------------------------------ helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, *flags: str) -> tuple[int, str]:
    """Runs dist_worker.py under `torchrun --nproc_per_node=2`; returns (exit status, output)."""
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        f"--master_port={_free_port()}", str(HERE / "dist_worker.py"), "--out", str(out), *flags,
    ]
    # A session of its own, so that a hung run is killed with all its workers.
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return -1, f"timed out after {LAUNCH_TIMEOUT_S}s\n{output}"
    return proc.returncode, output


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_same_weights(actual: dict, expected: dict, atol: float) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def train_logs(directory: Path) -> list[dict]:
    with open(directory / "log_history.json") as f:
        return [entry for entry in json.load(f) if "loss" in entry]


def assert_same_logs(actual: list[dict], expected: list[dict]) -> None:
    """Per-step loss (mean over processes, as HF logs it), pre-clip grad norm and learning rate."""
    assert [e["step"] for e in actual] == [e["step"] for e in expected] == list(range(1, worker.MAX_STEPS + 1))
    for a, e in zip(actual, expected):
        assert a["loss"] == pytest.approx(e["loss"], rel=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-5), a["step"]
        assert a["learning_rate"] == pytest.approx(e["learning_rate"], rel=1e-6, abs=1e-12), a["step"]


def assert_model_holds_saved_weights(export_dir: Path) -> None:
    """trainer.model (gathered on every rank under FSDP) equals what save_model wrote on rank 0."""
    with open(export_dir / "checks.json") as f:
        checks = json.load(f)
    assert checks["world_size"] == 2
    assert checks["saved_keys_missing_from_model"] == []
    assert checks["model_vs_saved_max_diff"] == 0.0


# ------------------------------------------------------------------ runs (once per module)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """One process, batch 4: the reference (trained in this process)."""
    out = tmp_path_factory.mktemp("single")
    worker.train_and_export(str(out / "run"), str(out / "final"), batch=4, fsdp=False)
    return out


@pytest.fixture(scope="module")
def launched(tmp_path_factory, single) -> tuple[Path, int, str]:
    """One torchrun launch runs both strategies in turn (interpreter start-up is most of its cost)."""
    out = tmp_path_factory.mktemp("two_processes")
    status, output = launch(out, "--batch", "2", "--strategies", "ddp", "fsdp", "--resume",
                            "--cross-resume", str(single / "run" / CKPT_MID))
    return out, status, output


def _strategy_dir(launched, strategy: str) -> Path:
    out, status, output = launched
    # DDP runs first: its results stand even if the FSDP part of the launch failed.
    if not (out / strategy / "cross" / "checks.json").is_file():
        pytest.fail(f"torchrun produced no complete {strategy} results (exit status {status}):\n{output[-4000:]}")
    return out / strategy


@pytest.fixture(scope="module")
def ddp(launched) -> Path:
    return _strategy_dir(launched, "ddp")


@pytest.fixture(scope="module")
def fsdp(launched) -> Path:
    out, status, output = launched
    assert status == 0, f"torchrun failed (exit status {status}):\n{output[-4000:]}"
    return _strategy_dir(launched, "fsdp")


# ------------------------------------------------------------------ DDP


def test_reference_run_trains(single):
    """Guards the comparisons below: the weights really moved away from the initialisation."""
    initial = worker.tiny_gpt2(seed=0).state_dict()
    final = weights(single / "final")
    assert max(float((final[k] - initial[k]).abs().max()) for k in final) > 1e-2


def test_ddp_matches_one_process_with_doubled_batch(single, ddp):
    assert_same_weights(weights(ddp / "final"), weights(single / "final"), atol=1e-5)
    assert_same_logs(train_logs(ddp / "final"), train_logs(single / "final"))
    assert_model_holds_saved_weights(ddp / "final")


def test_ddp_checkpoint_is_written_by_rank_zero(single, ddp):
    ckpt = ddp / "run" / CKPT_MID
    files = set(os.listdir(ckpt))
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin",
            "rng_state_0.pth", "rng_state_1.pth"} <= files
    assert "optimizer_shards" not in files and "rng_state.pth" not in files
    with open(ckpt / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == worker.SAVE_STEPS
    assert_same_weights(weights(ckpt), weights(single / "run" / CKPT_MID), atol=1e-5)


def test_ddp_resume_reaches_the_uninterrupted_weights(ddp):
    # The resumed run started from another initialisation: all it ends with came from checkpoint-3.
    assert_same_weights(weights(ddp / "resumed"), weights(ddp / "final"), atol=1e-7)
    assert_same_logs(train_logs(ddp / "resumed"), train_logs(ddp / "final"))
    assert_model_holds_saved_weights(ddp / "resumed")


def test_ddp_resumes_a_one_process_checkpoint(single, ddp):
    assert_same_weights(weights(ddp / "cross"), weights(single / "final"), atol=1e-5)
    assert_same_logs(train_logs(ddp / "cross"), train_logs(single / "final"))


# ------------------------------------------------------------------ FSDP2


def test_fsdp_matches_one_process_with_doubled_batch(single, fsdp):
    # Same key set as the unsharded save: the tied lm_head.weight is dropped as save_pretrained does.
    assert_same_weights(weights(fsdp / "final"), weights(single / "final"), atol=1e-5)
    assert_same_logs(train_logs(fsdp / "final"), train_logs(single / "final"))
    assert_model_holds_saved_weights(fsdp / "final")


def test_fsdp_checkpoint_has_full_model_and_per_rank_optimizer_shards(single, fsdp):
    ckpt = fsdp / "run" / CKPT_MID
    files = set(os.listdir(ckpt))
    assert {"model.safetensors", "scheduler.pt", "trainer_state.json", "training_args.bin",
            "rng_state_0.pth", "rng_state_1.pth", "optimizer_shards"} <= files
    assert "optimizer.pt" not in files
    shards = set(os.listdir(ckpt / "optimizer_shards"))
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= shards
    # The model file holds full (gathered) weights, equal to the unsharded run's at that step.
    assert_same_weights(weights(ckpt), weights(single / "run" / CKPT_MID), atol=1e-5)


def test_fsdp_resume_reaches_the_uninterrupted_weights(fsdp):
    assert_same_weights(weights(fsdp / "resumed"), weights(fsdp / "final"), atol=1e-7)
    assert_same_logs(train_logs(fsdp / "resumed"), train_logs(fsdp / "final"))
    assert_model_holds_saved_weights(fsdp / "resumed")


def test_fsdp_resumes_a_one_process_checkpoint(single, fsdp):
    """optimizer.pt (full, indexed by position) is split into FSDP2 shards on resume."""
    assert_same_weights(weights(fsdp / "cross"), weights(single / "final"), atol=1e-5)
    assert_same_logs(train_logs(fsdp / "cross"), train_logs(single / "final"))


def test_one_process_resumes_an_fsdp_checkpoint(single, fsdp, tmp_path):
    """optimizer_shards/ written by two processes is gathered back into one unsharded optimizer."""
    worker.train_and_export(str(tmp_path / "run"), str(tmp_path / "final"), batch=4, fsdp=False, seed=1,
                            resume_from=str(fsdp / "run" / CKPT_MID))
    assert_same_weights(weights(tmp_path / "final"), weights(single / "final"), atol=1e-5)
    assert_same_logs(train_logs(tmp_path / "final"), train_logs(single / "final"))
