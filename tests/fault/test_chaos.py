"""Repeated preemption: 10 cycles of run -> kill -> resume on one output directory, then the run must
end exactly where an uninterrupted run ends.

Per backend (torch, jax), with 1 process in the default suite and 2 processes in the slow one. Each
cycle draws from its seed:
    signal   SIGKILL or SIGTERM, to one process (a random rank);
    moment   "step": after a random number of steps past the resume point (plus a random part of
             a step), or "save": as soon as a checkpoint write of this cycle is on disk
             (tmp-checkpoint-N/), i.e. during a save;
    saving   synchronous or asynchronous (async_checkpointing) for this run.
and checks:
    SIGTERM  every process exits 143 having saved the same step, whose checkpoint verifies;
    SIGKILL  the other processes stop on their own with a clear error within a bounded time
             (torch: gloo sees the connection close; jax: the coordination service's heartbeat);
    always   the next run resumes from the newest complete checkpoint present (never a partial
             one), and nothing is left running.
After the 10 cycles a last run finishes the job: its final weights must equal the uninterrupted
run's (bitwise on jax, within 1e-6 on torch) and log_history must hold every step exactly once.

Figures (printed, and written to $XTRAINER_FAULT_REPORT/chaos_<backend>_<n>proc.json when set): the
total wasted steps (steps finished before a kill that the next run computes again) against the
theoretical minimum for the save interval (a kill after step k loses k mod save_steps steps when
saves are instantaneous; a SIGTERM loses none). A SIGKILL during the save of step k (k a multiple of
save_steps) loses save_steps steps where the minimum is 0: that is the difference between them.
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

CYCLES = 10
MAX_STEPS = 36
SAVE_STEPS = 3


def _options(backend: str, world: int, cache_dir: str) -> dict:
    # Steps a little slower than the tiny job's own (~5 ms), so that a save costs less than the
    # steps between two saves, as in a real run.
    options = {"max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "step_sleep_s": 0.02, "cache_dir": cache_dir}
    if backend == "jax" and world > 1:
        options["step_sleep_s"] = 0.15  # JAX's preemption notifier polls for SIGTERM once a second
    return options


def _plan(seed: int, cycle: int) -> dict:
    rng = np.random.default_rng([seed, cycle])
    return {
        "cycle": cycle,
        "signal": "SIGTERM" if rng.random() < 0.5 else "SIGKILL",
        "moment": "save" if rng.random() < 0.4 else "step",
        "async_save": bool(cycle % 2),
        "victim_draw": float(rng.random()),
        "steps_after_resume": int(rng.integers(1, 7)),
        "fraction_of_step": float(rng.random()),
    }


def _survivors_bound(backend: str) -> float:
    # torch: gloo notices a dead peer at once; jax: heartbeat timeout (10 s in the job) + margin.
    return 30.0 if backend == "torch" else 45.0


def _check_exit(backend: str, run: fleet.Run, plan: dict, victim: int, codes: list, signalled_at: float) -> list[str]:
    """The promises about how the processes of a killed run ended."""
    problems = []
    results = run.results()
    if plan["signal"] == "SIGTERM":
        if codes == [0] * len(codes) and all(r.get("global_step") == MAX_STEPS for r in results.values()):
            return []  # the signal came after the last step's agreement: the job simply finished
        if codes != [143] * len(codes):
            problems.append(f"SIGTERM: exit codes {codes}, expected 143 on every process")
        steps = {r["step"] for r in results.values() if r.get("exit") == "preempted"}
        if len(steps) != 1 or len(results) != len(codes):
            problems.append(f"SIGTERM: saved steps {steps} from {len(results)} of {len(codes)} processes")
        else:
            step = steps.pop()
            path = os.path.join(run.out_dir, f"checkpoint-{step}")
            if not os.path.isdir(path) or verify_checkpoint(path) is not Verdict.VERIFIED:
                problems.append(f"SIGTERM: checkpoint-{step} missing or unverified")
        return problems
    if codes[victim] != -signal.SIGKILL:
        problems.append(f"SIGKILL: the victim (rank {victim}) exited {codes[victim]}")
    for rank, code in enumerate(codes):
        if rank == victim:
            continue
        ended = results.get(rank, {}).get("ended_at")
        log = run.log(rank)
        # xtrainer's PeerProcessFailure; or, on jax, JAX's coordination service stops the process
        # (SIGABRT) and says why, when the process was inside a device collective at the time.
        clear = results.get(rank, {}).get("exit") == "peer_failure" and "Another process" in results[rank]["message"]
        if backend == "jax" and code == -signal.SIGABRT and "JAX distributed service detected fatal errors" in log:
            clear, ended = True, os.path.getmtime(os.path.join(run.run_dir, f"log-{rank}"))
        if not clear:
            problems.append(f"SIGKILL: survivor rank {rank} exited {code} without the clear error:\n{log[-2000:]}")
        elif ended - signalled_at > _survivors_bound(backend):
            problems.append(f"SIGKILL: survivor rank {rank} took {ended - signalled_at:.1f}s to stop")
    return problems


def _newer(path: str, since: float) -> bool:
    try:
        return os.stat(path).st_mtime >= since - 0.01
    except FileNotFoundError:
        return False


def _kill_cycle(fl: fleet.Fleet, root: str, plan: dict, resume_point: int, options: dict) -> tuple[dict, list[str]]:
    """One run of the job in root/, killed as planned; returns what happened and the broken promises."""
    out_dir = os.path.join(root, "out")
    run_dir = os.path.join(root, f"cycle-{plan['cycle']}")
    os.makedirs(run_dir)
    os.symlink(out_dir, os.path.join(run_dir, "out"))  # every cycle works on the same output directory
    # A "save" kill gets slow saves (0.15 s longer), so that the signal lands inside one.
    delay = 0.15 if plan["moment"] == "save" else 0.0
    run = fl.start(run_dir, resume=resume_point > 0, **options, async_save=plan["async_save"], save_delay_s=delay)
    victim = int(plan["victim_draw"] * fl.world)
    outcome = {**plan, "victim": victim, "resumed_from": resume_point}
    target = min(resume_point + plan["steps_after_resume"], MAX_STEPS - 1)
    started = time.time()
    if plan["moment"] == "save":
        def in_save():  # a checkpoint write of this run (not one that an earlier kill left behind)
            return any(_newer(os.path.join(out_dir, name), started) and int(name.rsplit("-", 1)[1]) > resume_point
                       for name in fleet.listing(out_dir)["partial"])
        alive = fleet.wait_until(in_save, run, interval=0.001)
    else:
        alive = fleet.wait_until(lambda: run.steps_done() >= target, run)
        progress = run.progress(0)
        step_s = (progress[-1][1] - progress[0][1]) / max(len(progress) - 1, 1) if len(progress) > 1 else 0.01
        time.sleep(plan["fraction_of_step"] * step_s)
    signalled_at = time.time()
    sent = alive and run.signal(victim, signal.SIGTERM if plan["signal"] == "SIGTERM" else signal.SIGKILL)
    at_kill = fleet.listing(out_dir)
    at_kill["partial"] = [n for n in at_kill["partial"] if _newer(os.path.join(out_dir, n), started)]
    outcome["steps_at_signal"] = run.steps_done()
    codes = run.wait(timeout=90)
    outcome["steps_done"] = run.steps_done()  # after a SIGTERM the ranks finish the agreed step first
    outcome.update(codes=codes, complete_after=fleet.listing(out_dir)["complete"], partial_at_kill=at_kill["partial"])
    if not sent:  # the run ended before the signal (near the end of the job): nothing was killed
        outcome["finished_before_signal"] = True
        ok = all(c == 0 for c in codes)
        return outcome, [] if ok else [f"run ended before the signal with {codes}:\n{run.logs_tail()}"]
    problems = _check_exit(fl.backend, run, plan, victim, codes, signalled_at)
    first = [run.progress(r)[0][0] for r in range(fl.world) if run.progress(r)]
    if first and min(first) != resume_point + 1:
        problems.append(f"the run started at step {min(first)}, expected {resume_point + 1} (newest complete checkpoint)")
    return outcome, problems


def run_chaos(backend: str, world: int, tmp_path, seed: int) -> dict:
    """The whole chaos experiment for one backend and topology; returns its figures (asserts inside)."""
    started = time.monotonic()
    cache_dir = str(tmp_path / "jax_cache")
    options = _options(backend, world, cache_dir)
    fl = fleet.Fleet(backend, world)
    outcomes, failures = [], []
    try:
        reference = fl.start(str(tmp_path / "reference"), **options)
        codes = reference.wait(timeout=240)
        assert codes == [0] * world, reference.logs_tail()
        ref_weights, ref_history = reference.weights(0), reference.results()[0]["log_history"]
        root = str(tmp_path / "chaos")
        os.makedirs(os.path.join(root, "out"))
        resume_point = 0
        for cycle in range(CYCLES):
            outcome, problems = _kill_cycle(fl, root, _plan(seed, cycle), resume_point, options)
            complete = outcome["complete_after"]
            resume_point = complete[-1] if complete else 0
            outcome["next_resume"] = resume_point
            outcomes.append(outcome)
            failures += [f"cycle {cycle} {outcome}: {p}" for p in problems]
            if problems:
                break
        if not failures:
            final_dir = os.path.join(root, "final")
            os.makedirs(final_dir)
            os.symlink(os.path.join(root, "out"), os.path.join(final_dir, "out"))
            final = fl.start(final_dir, resume=resume_point > 0, **options)
            codes = final.wait(timeout=240)
            if codes != [0] * world:
                failures.append(f"the final run exited {codes}:\n{final.logs_tail()}")
            else:
                failures += fleet.compare_weights(backend, final.weights(0), ref_weights)
                failures += fleet.compare_history(backend, final.results()[0]["log_history"], ref_history, MAX_STEPS)
    finally:
        fl.close()
    killed = [o for o in outcomes if not o.get("finished_before_signal")]
    wasted = sum(max(o["steps_done"] - o["next_resume"], 0) for o in killed)
    minimum = sum(0 if o["signal"] == "SIGTERM" else o["steps_done"] % SAVE_STEPS for o in killed)
    summary = {
        "backend": backend, "processes": world, "cycles": len(outcomes), "kills": len(killed),
        "sigterm": sum(o["signal"] == "SIGTERM" for o in killed), "sigkill": sum(o["signal"] == "SIGKILL" for o in killed),
        "during_save": sum(o["moment"] == "save" for o in killed),
        "killed_with_partial_checkpoint_on_disk": sum(bool(o["partial_at_kill"]) for o in killed),
        "async_cycles": sum(o["async_save"] for o in killed),
        "wasted_steps": wasted, "minimum_wasted_steps": minimum, "save_steps": SAVE_STEPS,
        "failures": len(failures), "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary))
    report_dir = os.environ.get("XTRAINER_FAULT_REPORT")
    if report_dir:
        os.makedirs(report_dir, exist_ok=True)
        with open(os.path.join(report_dir, f"chaos_{backend}_{world}proc.json"), "w") as f:
            json.dump({**summary, "outcomes": outcomes, "failure_messages": failures}, f, indent=1)
    assert not failures, "\n".join(failures)
    assert len(killed) >= CYCLES - 2, summary  # the kills must land
    return summary


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_repeated_kills_of_one_process_end_as_an_uninterrupted_run(backend, tmp_path):
    run_chaos(backend, 1, tmp_path, seed=11)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_repeated_kills_of_two_processes_end_as_an_uninterrupted_run(backend, tmp_path):
    run_chaos(backend, 2, tmp_path, seed=23)
