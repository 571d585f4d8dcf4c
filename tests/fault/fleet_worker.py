"""Training jobs of one or several processes for the fault tests at scale (test_faults_at_scale.py,
test_chaos.py): preemption agreement, a dead rank, a failed save on one rank, repeated kills, and
nan_policy under DDP / FSDP.

The job is kill_worker.py's (a tiny MLP with dropout, cosine schedule, random data order,
gradient accumulation 2, a checkpoint every `save_steps`) with the same global batch (4 examples
per micro-batch) on any topology: torch with 1 or 2 processes (gloo), jax with 1 or 2 processes of 2
CPU devices each (jax.distributed). Every process of a run is a child forked by a per-rank *fork
server* (`python fleet_worker.py serve <backend>`), which imports torch/jax once, so a run starts
in a fraction of a second instead of the ~15 s of a new interpreter; the test then kills or signals
the child like any training process.

A child writes, into the run's directory:
    progress-<rank>   one line per finished optimizer step ("<step> <time>");
    result-<rank>.json  how it ended: {"exit": finished | preempted | peer_failure | save_failed |
                      nonfinite | error, "message", "step", "failed_rank", "path", "log_history", ...};
    weights-<rank>.npz  the final weights (when it finished).
Exit codes: 0 finished, 143 preempted (TrainingPreempted), 1 any error (after writing its result).

Test-only hooks, set per run in `options` (nothing in xtrainer changes):
    save_delay_s      each save's file writes take this much longer (widens "during a save");
    cache_dir         jax: the persistent compilation cache shared by the runs of a test;
    step_sleep_s      each step takes this much longer on the host (JAX's preemption notifier looks
                      for SIGTERM once a second: the run must outlast that);
    pause             {"step", "rank", "phase"}: that rank stops inside the save of that step
                      ("backend": its files written; "unpublished": all written, not renamed), writes
                      `paused-<rank>` and sleeps until killed;
    fail_save         {"step", "rank", "errno"}: that rank's write of that checkpoint fails
                      (ENOSPC: a full disk, EIO: an I/O error) after writing part of a file;
    poison            {"step", "rank"}: that rank's first micro-batch of that step has a NaN loss
                      (finite gradients) - the "poisonable" model only.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
import traceback

import kill_worker  # noqa: F401  (sets XLA_FLAGS: 2 CPU devices per process, before jax is imported)
from kill_worker import _import_backend, _preload, job_data, job_model

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def job_args(backend: str, out_dir: str, world: int, options: dict):
    """The arguments of every run of a job: the same global batch whatever the topology."""
    import xtrainer

    devices = world * (2 if backend == "jax" else 1)
    save_steps = options.get("save_steps", 2)
    extra = {}
    if backend == "torch":
        extra["use_cpu"] = True
        if options.get("fsdp"):
            extra["fsdp"] = "full_shard"
    elif options.get("cache_dir"):
        extra["jax_compilation_cache_dir"] = options["cache_dir"]
    return xtrainer.TrainingArguments(
        out_dir,
        backend=backend,
        per_device_train_batch_size=4 // devices,
        gradient_accumulation_steps=2,
        learning_rate=0.02,
        lr_scheduler_type="cosine",
        warmup_steps=3,
        max_steps=options.get("max_steps", 16),
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=3,
        logging_steps=1,
        seed=7,
        report_to="none",
        disable_tqdm=True,
        enable_jit_checkpoint=True,  # SIGTERM saves a checkpoint (transformers' switch for it)
        async_checkpointing=bool(options.get("async_save")),
        nan_policy=options.get("nan_policy", "ignore"),
        ddp_timeout=options.get("ddp_timeout", 120),
        jax_heartbeat_timeout=options.get("heartbeat_s", 10),
        **extra,
    )


def poisonable_model():
    """An MLP whose loss is NaN for a row with poison=NaN while its gradients stay finite."""
    import torch
    from torch import nn

    class PoisonableMLP(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.l1, self.l2 = nn.Linear(4, 16), nn.Linear(16, 1)

        def forward(self, x, labels=None, poison=None):
            y = self.l2(torch.relu(self.l1(x)))[..., 0]
            out = {"logits": y}
            if labels is not None:
                loss = nn.functional.mse_loss(y, labels)
                if poison is not None:
                    loss = loss + poison.detach().sum()  # NaN when poisoned; no effect on the gradients
                out["loss"] = loss
            return out

    return PoisonableMLP()


def _weights(trainer, backend: str) -> dict[str, np.ndarray]:
    """Full final weights on this process (FSDP shards and multi-host arrays gathered: collective)."""
    if backend == "jax":
        import jax
        from flax import nnx
        from jax.experimental import multihost_utils

        out = {}
        for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(trainer.model, nnx.Param)):
            if getattr(x, "is_fully_replicated", False):
                out[jax.tree_util.keystr(path)] = np.asarray(x.addressable_shards[0].data)
            else:
                out[jax.tree_util.keystr(path)] = np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return out
    return {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().numpy()
            for name, t in trainer.model.state_dict().items()}


def _install_hooks(trainer, run_dir: str, rank: int, options: dict) -> None:
    """The test-only hooks of the module docstring, on this process's trainer."""
    import xtrainer.checkpoint as ckpt

    delay = float(options.get("save_delay_s", 0.0))
    pause, fail = options.get("pause"), options.get("fail_save")
    real_save_async = trainer.backend.save_async

    def at(directory, spec) -> bool:
        return bool(spec) and spec["rank"] == rank and os.path.basename(os.path.normpath(directory)) == f"tmp-checkpoint-{spec['step']}"

    def wait_to_be_killed():
        open(os.path.join(run_dir, f"paused-{rank}"), "w").close()
        time.sleep(600)
        raise RuntimeError("fleet_worker: the test did not kill the paused process")

    def save_async(state, directory, **kw):  # every save: the backends' `save` calls it too
        if at(directory, fail) and trainer.backend.name == "jax":
            _fail_jax_write(fail, directory)
        finish = real_save_async(state, directory, **kw)

        def finish_slowly():
            if delay:
                time.sleep(delay)
            finish()
            if at(directory, pause) and pause["phase"] == "backend":
                wait_to_be_killed()

        return finish_slowly

    trainer.backend.save_async = save_async
    if fail and fail["rank"] == rank and trainer.backend.name == "torch":
        _fail_torch_write(fail)
    real_publish = ckpt.publish_temporary

    def publish_temporary(out_dir, step):
        if at(ckpt.temporary_dir(out_dir, step), pause) and pause["phase"] == "unpublished":
            wait_to_be_killed()
        return real_publish(out_dir, step)

    ckpt.publish_temporary = publish_temporary  # only process 0 publishes: "unpublished" pauses are for rank 0


def _simulated_failure(spec: dict, path: str) -> OSError:
    code = errno.ENOSPC if spec.get("errno", "ENOSPC") == "ENOSPC" else errno.EIO
    return OSError(code, os.strerror(code), path)


def _fail_torch_write(spec: dict) -> None:
    """The rank's own file of that checkpoint (rng_state_<rank>.pth) fails half-written."""
    import torch

    real = torch.save
    target = f"tmp-checkpoint-{spec['step']}"

    def save(obj, path, *args, **kwargs):
        if target in str(path) and os.path.basename(str(path)).startswith("rng_state"):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise _simulated_failure(spec, str(path))
        return real(obj, path, *args, **kwargs)

    torch.save = save  # this child only


def _fail_jax_write(spec: dict, directory: str) -> None:
    """Orbax's background write of this process fails: the error comes before orbax's barrier, which
    the other processes then wait at (as when tensorstore fails writing this process's shards)."""
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    real = async_checkpointer._background_wait_for_commit_futures
    path = os.path.join(os.path.abspath(directory), "jax_state", f"ocdbt.process_{spec['rank']}")

    def fail_after_writing(directory_, commit_futures, *args, **kwargs):
        async_checkpointer._background_wait_for_commit_futures = real  # once
        for future in commit_futures:
            future.result()
        raise _simulated_failure(spec, path)

    async_checkpointer._background_wait_for_commit_futures = fail_after_writing


def _poisoned_collator(spec: dict, rank: int):
    """Sets a NaN `poison` in this rank's first micro-batch of step spec["step"] (2 micro-batches a step)."""
    from xtrainer.data import default_data_collator

    calls = {"n": 0}

    def collate(rows):
        batch = default_data_collator(rows)
        batch["poison"] = np.zeros(len(rows), np.float32)
        if spec["rank"] == rank and calls["n"] == 2 * (spec["step"] - 1):
            batch["poison"][0] = np.nan
        calls["n"] += 1
        return batch

    return collate


def run_job(backend: str, run_dir: str, rank: int, world: int, resume: bool, options: dict) -> int:
    """One process of one run; returns its exit code (see the module docstring)."""
    started = time.time()
    import xtrainer
    from xtrainer.checkpoint import CheckpointDiskFullError, CheckpointWriteError
    from xtrainer.nan_policy import NonFiniteTrainingError
    from xtrainer.peer_failure import PeerProcessFailure
    from xtrainer.preemption import TrainingPreempted

    if backend == "torch":
        import torch

        torch.set_num_threads(1)
    cache_dir = options.get("cache_dir")
    if backend == "jax" and cache_dir:
        import jax

        # Every run compiles the same programs: later runs load them (set before the model is built).
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    out_dir = os.path.join(run_dir, "out")
    progress = os.path.join(run_dir, f"progress-{rank}")
    info: dict = {"rank": rank, "resumed_from": None, "log_history": None}
    step_sleep = float(options.get("step_sleep_s", 0.0))

    class Progress(xtrainer.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            info["resumed_from"] = state.global_step if resume else None

        def on_step_end(self, args, state, control, **kwargs):
            with open(progress, "a") as f:
                f.write(f"{state.global_step} {time.time():.3f}\n")
            if step_sleep:
                time.sleep(step_sleep)

    args = job_args(backend, out_dir, world, options)
    poison = options.get("poison")
    model = poisonable_model() if options.get("model") == "poisonable" else job_model(backend)
    collator = _poisoned_collator(poison, rank) if poison else None
    trainer = xtrainer.Trainer(model=model, args=args, train_dataset=job_data(), data_collator=collator,
                               callbacks=[Progress()])
    _install_hooks(trainer, run_dir, rank, options)
    code = 0
    try:
        trainer.train(resume_from_checkpoint=True if resume else None)
        info["exit"] = "finished"
        np.savez(os.path.join(run_dir, f"weights-{rank}.npz"), **_weights(trainer, backend))
    except TrainingPreempted as exc:
        info.update(exit="preempted", step=exc.step, message=str(exc))
        code = 143
    except PeerProcessFailure as exc:
        info.update(exit="peer_failure", step=exc.step, message=str(exc))
        code = 1
    except (CheckpointDiskFullError, CheckpointWriteError) as exc:
        info.update(exit="save_failed", type=type(exc).__name__, failed_rank=exc.rank, path=exc.path,
                    step=exc.step, message=str(exc))
        code = 1
    except NonFiniteTrainingError as exc:
        info.update(exit="nonfinite", step=exc.step, metric=exc.metric, message=str(exc))
        code = 1
    info["log_history"] = trainer.state.log_history
    info["global_step"] = trainer.state.global_step
    info["total_s"] = time.time() - started
    info["ended_at"] = time.time()
    with open(os.path.join(run_dir, f"result-{rank}.json.tmp"), "w") as f:
        json.dump(info, f)
    os.replace(os.path.join(run_dir, f"result-{rank}.json.tmp"), os.path.join(run_dir, f"result-{rank}.json"))
    return code


def _child(backend: str, request: dict) -> None:
    """Body of a forked child: one process of one run, output in run_dir/log-<rank>; never returns."""
    code = 1
    try:
        rank = request["rank"]
        log = os.open(os.path.join(request["run_dir"], f"log-{rank}"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdin = open(os.devnull)
        os.environ.update(request.get("env", {}))
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        before = set(sys.modules)
        code = run_job(backend, request["run_dir"], rank, request.get("world", 1), request.get("resume", False),
                       request.get("options", {}))
        with open(os.path.join(request["run_dir"], f"modules-{rank}.json"), "w") as f:
            json.dump(sorted(set(sys.modules) - before), f)  # for the server's next children (see serve)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(backend: str) -> None:
    """The fork server: one JSON request per line on stdin, one JSON answer per line on stdout.

    {"op": "run", "run_dir", "rank", "world", "resume", "env", "options"} -> {"pid"};
    {"op": "wait" | "poll", "pid"} -> {"exit": code (-signal when killed), or null while running}.
    """
    t0 = time.perf_counter()
    _import_backend(backend)
    children: dict[int, str] = {}
    preloaded = False
    sys.stdout.write(json.dumps({"ready": True, "import_s": time.perf_counter() - t0}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "run":
                os.makedirs(request["run_dir"], exist_ok=True)
                pid = os.fork()
                if pid == 0:
                    _child(backend, request)
                children[pid] = request["run_dir"]
                answer = {"pid": pid}
            else:
                done, status = os.waitpid(request["pid"], 0 if request["op"] == "wait" else os.WNOHANG)
                answer = {"exit": None}
                if done:
                    run_dir = children.pop(request["pid"], None)
                    answer = {"exit": os.waitstatus_to_exitcode(status)}
                    if run_dir and not preloaded:
                        # What a finished run imported lazily: later children start with it loaded.
                        for name in os.listdir(run_dir):
                            if name.startswith("modules-"):
                                _preload(os.path.join(run_dir, name))
                                preloaded = True
        except Exception as exc:  # noqa: BLE001 - answer rather than leave the client waiting
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    for pid in list(children):  # the client is gone: end what it left running
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit("usage: fleet_worker.py serve {torch,jax}")
