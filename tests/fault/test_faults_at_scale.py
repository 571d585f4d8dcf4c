"""Faults of runs with several processes (2 processes: torch DDP/FSDP over gloo, jax.distributed with
2 CPU devices per process): nothing hangs, nothing is lost.

- SIGTERM to any one rank at a random step: every rank saves the same step and exits 143; that
  checkpoint (the only one: the job saves nothing else) verifies, and resuming it on both
  processes ends with the uninterrupted run's weights and history (10 trials per backend).
- kill -9 of one rank, also in the middle of a save: the other stops by itself with a clear error
  within a bounded time; the checkpoint being written is never published; resuming with both
  processes ends as the uninterrupted run.
- a full disk or an I/O error on one rank during a save: no checkpoint-N is published, every rank
  raises the same CheckpointDiskFullError / CheckpointWriteError naming that rank and its file, and
  the earlier checkpoints still verify.
- nan_policy under DDP and FSDP: one rank's NaN loss skips the step on every rank ("skip") or stops
  every rank with the same error ("raise").
- an asynchronous save under FSDP (optimizer shards through dcp.async_save) resumes exactly.

The 1-process versions of these promises are in the default suite (test_sigterm.py,
test_kill_resume.py, test_chaos.py, test_checkpoint_agreement.py, test_nan_policy.py).
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

import fleet
from xtrainer.manifest import Verdict, verify_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TRIALS = int(os.environ.get("XTRAINER_PREEMPT_TRIALS", "10"))
MAX_STEPS = 16
JAX_HEARTBEAT_S = 10  # fleet_worker's jax_heartbeat_timeout


def _bound(backend: str) -> float:
    """How long a surviving process may take to stop: gloo sees a dead peer at once; JAX's service
    declares it dead after the heartbeat timeout."""
    return 20.0 if backend == "torch" else JAX_HEARTBEAT_S + 25.0


@pytest.fixture(scope="module")
def fleets(tmp_path_factory):
    """Two fork servers per backend, and each backend's uninterrupted reference run, made on first use."""
    made: dict = {}

    def get(backend: str):
        if backend not in made:
            fl = fleet.Fleet(backend, 2)
            cache = str(tmp_path_factory.mktemp(f"{backend}_cache"))
            reference = fl.start(str(tmp_path_factory.mktemp(f"{backend}_reference")), cache_dir=cache)
            codes = reference.wait(timeout=240)
            assert codes == [0, 0], reference.logs_tail()
            made[backend] = (fl, reference, cache)
        return made[backend]

    yield get
    for fl, _, _ in made.values():
        fl.close()


def _resume_matches(fl, run_dir: str, reference, backend: str, cache: str, **options) -> list[str]:
    resumed = fl.start(run_dir, resume=True, cache_dir=cache, **options)
    codes = resumed.wait(timeout=240)
    if codes != [0, 0]:
        return [f"the resume exited {codes}:\n{resumed.logs_tail()}"]
    problems = fleet.compare_weights(backend, resumed.weights(0), reference.weights(0))
    problems += fleet.compare_weights(backend, resumed.weights(1), reference.weights(0))  # both ranks hold them
    problems += fleet.compare_history(backend, resumed.results()[0]["log_history"],
                                      reference.results()[0]["log_history"], MAX_STEPS)
    return problems


# ---------------------------------------------------------------- 1. ranks agree on preemption


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(fleets, backend, tmp_path):
    fl, reference, cache = fleets(backend)
    # A step of ~50 ms: the signal lands where the trial aims it, and the run outlasts the agreement.
    options = {"save_steps": 0, "step_sleep_s": 0.05, "cache_dir": cache}
    outcomes, failures = [], []
    for trial in range(TRIALS):
        rng = np.random.default_rng([trial, 0 if backend == "torch" else 1])
        rank, target = int(rng.integers(2)), int(rng.integers(1, MAX_STEPS - 5))
        run = fl.start(str(tmp_path / f"trial-{trial}"), **options)
        outcome = {"trial": trial, "rank": rank, "target": target}
        try:
            assert fleet.wait_until(lambda: len(run.progress(rank)) >= target, run), run.logs_tail()
            time.sleep(float(rng.random()) * 0.05)
            outcome["signalled_after"] = run.steps_done()
            assert run.signal(rank, signal.SIGTERM)
            codes = run.wait(timeout=60)
            results = run.results()
            outcome.update(codes=codes, saved={r: res.get("step") for r, res in results.items()})
            assert codes == [143, 143], f"exit codes {codes}:\n{run.logs_tail()}"
            steps = {res["step"] for res in results.values()}
            assert len(results) == 2 and len(steps) == 1, f"the ranks saved {outcome['saved']}"
            step = steps.pop()
            assert step >= outcome["signalled_after"] - 1
            assert fleet.listing(run.out_dir) == {"complete": [step], "partial": []}
            assert verify_checkpoint(os.path.join(run.out_dir, f"checkpoint-{step}")) is Verdict.VERIFIED
            problems = _resume_matches(fl, run.run_dir, reference, backend, cache, save_steps=0)
            assert not problems, "\n".join(problems)
        except AssertionError as exc:
            failures.append(f"trial {outcome}: {exc}")
        outcomes.append(outcome)
    lags = [o["saved"][0] - o["signalled_after"] for o in outcomes if o.get("saved", {}).get(0) is not None]
    print(json.dumps({"backend": backend, "trials": len(outcomes), "failures": len(failures),
                      "saved_step_minus_step_at_signal": lags}))
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- 2. one rank dies


def _check_survivor(backend: str, run: fleet.Run, survivor: int, code, killed_at: float) -> float:
    result = run.results().get(survivor, {})
    log = run.log(survivor)
    if result.get("exit") == "peer_failure":
        assert "Another process of this 2-process run stopped" in result["message"], result["message"]
        assert "resume_from_checkpoint=True" in result["message"]
        ended = result["ended_at"]
    else:  # jax: the coordination service stops a process blocked in a device collective, and says why
        assert backend == "jax" and code == -signal.SIGABRT, f"survivor exited {code}:\n{log[-3000:]}"
        assert "JAX distributed service detected fatal errors" in log, log[-3000:]
        ended = os.path.getmtime(os.path.join(run.run_dir, f"log-{survivor}"))
    assert ended - killed_at <= _bound(backend), f"the survivor took {ended - killed_at:.1f}s to stop"
    return ended - killed_at


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_killed_rank_stops_the_others_with_a_clear_error(fleets, backend, tmp_path):
    fl, reference, cache = fleets(backend)
    stop_times = {}
    # (a) rank 1 dies in the middle of the save of checkpoint-4 (its files written, not yet agreed).
    run = fl.start(str(tmp_path / "in_save"), cache_dir=cache, pause={"step": 4, "rank": 1, "phase": "backend"})
    assert fleet.wait_until(lambda: os.path.exists(os.path.join(run.run_dir, "paused-1")), run), run.logs_tail()
    killed_at = time.time()
    run.signal(1, signal.SIGKILL)
    codes = run.wait(timeout=_bound(backend) + 30)
    assert codes[1] == -signal.SIGKILL
    stop_times["rank 1 killed in a save"] = _check_survivor(backend, run, 0, codes[0], killed_at)
    assert fleet.listing(run.out_dir)["complete"] == [2]  # checkpoint-4 was never published
    assert verify_checkpoint(os.path.join(run.out_dir, "checkpoint-2")) is Verdict.VERIFIED
    problems = _resume_matches(fl, run.run_dir, reference, backend, cache)
    assert not problems, "\n".join(problems)

    # (b) rank 0 (the one that publishes; on jax also the coordinator) dies between saves.
    run = fl.start(str(tmp_path / "mid_step"), cache_dir=cache, step_sleep_s=0.05)
    assert fleet.wait_until(lambda: run.steps_done() >= 7, run), run.logs_tail()
    killed_at = time.time()
    run.signal(0, signal.SIGKILL)
    codes = run.wait(timeout=_bound(backend) + 30)
    assert codes[0] == -signal.SIGKILL
    stop_times["rank 0 killed mid-run"] = _check_survivor(backend, run, 1, codes[1], killed_at)
    newest = fleet.listing(run.out_dir)["complete"][-1]
    assert verify_checkpoint(os.path.join(run.out_dir, f"checkpoint-{newest}")) is Verdict.VERIFIED
    problems = _resume_matches(fl, run.run_dir, reference, backend, cache)
    assert not problems, "\n".join(problems)
    print(json.dumps({"backend": backend, "survivor_stop_s": {k: round(v, 2) for k, v in stop_times.items()}}))


# ---------------------------------------------------------------- 3. one rank's save fails


@pytest.mark.timeout(600)
@pytest.mark.parametrize("errno_name", ["ENOSPC", "EIO"])
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_failed_save_on_one_rank_fails_it_on_every_rank(fleets, backend, errno_name, tmp_path):
    fl, _, cache = fleets(backend)
    started = time.time()
    run = fl.start(str(tmp_path / "run"), cache_dir=cache, fail_save={"step": 4, "rank": 1, "errno": errno_name})
    codes = run.wait(timeout=120)
    results = run.results()
    assert codes == [1, 1], f"{codes}:\n{run.logs_tail()}"
    expected = "CheckpointDiskFullError" if errno_name == "ENOSPC" else "CheckpointWriteError"
    for rank in (0, 1):
        res = results[rank]
        assert res["exit"] == "save_failed" and res["type"] == expected, res
        assert res["step"] == 4 and res["failed_rank"] == 1, res
        assert res["message"] == results[0]["message"]  # the same error on every rank
    message, path = results[0]["message"], results[0]["path"]
    assert "failed on process 1" in message and path and path in message and "resume_from_checkpoint=True" in message
    assert os.path.basename(path) == ("rng_state_1.pth" if backend == "torch" else "ocdbt.process_1"), path
    assert fleet.listing(run.out_dir) == {"complete": [2], "partial": []}
    assert verify_checkpoint(os.path.join(run.out_dir, "checkpoint-2")) is Verdict.VERIFIED
    assert max(r["ended_at"] for r in results.values()) - started < 90
    print(json.dumps({"backend": backend, "errno": errno_name, "message": message}))


# ---------------------------------------------------------------- 5. nan_policy under DDP and FSDP


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nan_policy_is_one_decision_for_every_rank(fleets, strategy, tmp_path):
    """Rank 1's loss is NaN at step 3 while its gradients are finite: every rank must skip that step
    ('skip'), or stop with the same error ('raise')."""
    fl, _, _ = fleets("torch")
    common = {"model": "poisonable", "save_steps": 0, "max_steps": 6, "fsdp": strategy == "fsdp"}

    def run(name, **options):
        r = fl.start(str(tmp_path / name), **common, **options)
        return r, r.wait(timeout=120)

    on_rank1, codes = run("skip_rank1", nan_policy="skip", poison={"step": 3, "rank": 1})
    assert codes == [0, 0], on_rank1.logs_tail()
    on_rank0, codes = run("skip_rank0", nan_policy="skip", poison={"step": 3, "rank": 0})
    assert codes == [0, 0], on_rank0.logs_tail()
    clean, codes = run("clean", nan_policy="skip")
    assert codes == [0, 0], clean.logs_tail()
    for r in (on_rank1, on_rank0):
        for rank in (0, 1):
            skipped = [h["nan_skipped_steps"] for h in r.results()[rank]["log_history"] if "loss" in h]
            assert skipped == [0, 0, 1, 1, 1, 1], (rank, skipped)
            weights = r.weights(rank)
            assert all(np.isfinite(w).all() for w in weights.values())
            # The same update on every rank: their weights, and the run poisoned on the other rank.
            assert not fleet.compare_weights("torch", weights, on_rank1.weights(0))
    assert fleet.compare_weights("torch", on_rank1.weights(0), clean.weights(0))  # step 3 really was skipped

    raised, codes = run("raise", nan_policy="raise", poison={"step": 3, "rank": 1})
    assert codes == [1, 1], raised.logs_tail()
    results = raised.results()
    assert {(res["exit"], res["step"], res["metric"]) for res in results.values()} == {("nonfinite", 3, "loss")}


# ---------------------------------------------------------------- 6. asynchronous saves under FSDP


@pytest.mark.timeout(300)
def test_an_async_fsdp_checkpoint_resumes_exactly(fleets, tmp_path):
    """FSDP's optimizer shards go through torch.distributed.checkpoint.async_save: the checkpoint an
    asynchronous save published mid-run resumes to the uninterrupted run's end."""
    fl, _, _ = fleets("torch")
    reference = fl.start(str(tmp_path / "reference"), fsdp=True)
    assert reference.wait(timeout=120) == [0, 0], reference.logs_tail()
    run = fl.start(str(tmp_path / "run"), fsdp=True, async_save=True)
    assert run.wait(timeout=120) == [0, 0], run.logs_tail()
    assert not fleet.compare_weights("torch", run.weights(0), reference.weights(0))
    assert fleet.listing(run.out_dir) == {"complete": [12, 14, 16], "partial": []}
    assert sorted(os.listdir(os.path.join(run.out_dir, "checkpoint-12", "optimizer_shards"))) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    for step in (14, 16):  # resume from the checkpoint written while training went on
        os.rename(os.path.join(run.out_dir, f"checkpoint-{step}"), os.path.join(run.run_dir, f"moved-{step}"))
    resumed = fl.start(run.run_dir, resume=True, fsdp=True, async_save=True)
    assert resumed.wait(timeout=120) == [0, 0], resumed.logs_tail()
    assert resumed.results()[0]["resumed_from"] == 12
    assert not fleet.compare_weights("torch", resumed.weights(0), reference.weights(0))
    assert not fleet.compare_history("torch", resumed.results()[0]["log_history"],
                                     reference.results()[0]["log_history"], MAX_STEPS)
