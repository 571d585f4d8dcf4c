"""The training job that tests/fault/test_kill_resume.py kills with SIGKILL and then resumes.

One job is a short, deterministic run (a tiny MLP with dropout on, a cosine schedule with warmup,
random data order over a few epochs, gradient accumulation, a checkpoint every 2 steps with rotation)
on either the `torch` or the `jax` backend. At the end it writes its final weights
(`weights.npz`) and `result.json` (log_history, the step it resumed from, timings).

Starting Python and importing torch/jax/xtrainer takes seconds, far longer than a run, so the test
talks to a *fork server* (`python kill_worker.py serve <backend>`): it imports everything once and
forks a fresh child process per run. The child is an ordinary training process from the point of
view of the trainer: the test SIGKILLs it at a chosen moment, and the resume runs in another fresh
child that only sees what is on disk. The server itself never touches a device or runs an
operator before forking (it has one thread, so fork is safe), and each child sets up jax/torch
itself. `python kill_worker.py run <backend> <trial_dir> [--resume]` runs one job directly.

Test-only hooks (set per run by the test, not environment variables; nothing in xtrainer changes):
    pause_at_step / pause_phase: at the save of that step, write `<trial>/paused` and sleep, so the
    test can SIGKILL the process at an exact point inside the checkpoint write:
      "empty"       - tmp-checkpoint-N/ exists, nothing written into it yet;
      "backend"     - the backend's files (weights, optimizer, RNG / orbax state) are written (with
                      async_save, in the background thread while the step loop goes on);
      "unpublished" - every file is written (trainer_state.json, training_args.bin), the directory
                      is not yet renamed to checkpoint-N/.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

# The job's JAX runs on 2 fake CPU devices (a real data-parallel mesh, still fast); this must be
# set before jax is imported, and overrides the 8 devices the pytest process asks for.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/ (jax_models)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root (xtrainer)

import numpy as np  # noqa: E402

MAX_STEPS = 16
SAVE_STEPS = 2
SAVE_TOTAL_LIMIT = 3
NUM_EXAMPLES = 44  # 11 micro-batches of 4 per epoch: epochs end mid-window, resumes land mid-epoch


def job_args(backend: str, out_dir: str, **extra):
    """The TrainingArguments of every run (reference, killed and resumed alike)."""
    import xtrainer

    return xtrainer.TrainingArguments(
        out_dir,
        backend=backend,
        per_device_train_batch_size=2 if backend == "jax" else 4,  # x2 devices on jax: 4 examples per micro-batch
        gradient_accumulation_steps=2,
        learning_rate=0.02,
        lr_scheduler_type="cosine",
        warmup_steps=3,
        max_steps=MAX_STEPS,
        save_steps=SAVE_STEPS,
        save_total_limit=SAVE_TOTAL_LIMIT,
        logging_steps=1,
        seed=7,
        report_to="none",
        disable_tqdm=True,
        **extra,
    )


def job_data() -> list[dict]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(NUM_EXAMPLES, 4)).astype(np.float32)
    w = np.array([1.0, -2.0, 3.0, 0.5], np.float32)
    y = x @ w + rng.normal(scale=0.1, size=NUM_EXAMPLES).astype(np.float32)
    return [{"x": x[i], "labels": float(y[i])} for i in range(NUM_EXAMPLES)]


def job_model(backend: str):
    """A tiny MLP with dropout 0.1, so a resume that lost the RNG state would diverge."""
    if backend == "jax":
        from flax import nnx
        from jax_models import RegressionMLP

        return RegressionMLP(nnx.Rngs(0, dropout=5), dropout=0.1)
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 16), nn.Linear(16, 1)
            self.drop = nn.Dropout(0.1)

        def forward(self, x, labels=None):
            y = self.l2(self.drop(torch.relu(self.l1(x))))[..., 0]
            out = {"logits": y}
            if labels is not None:
                out["loss"] = nn.functional.mse_loss(y, labels)
            return out

    torch.manual_seed(0)
    return MLP()


def final_weights(trainer, backend: str) -> dict[str, np.ndarray]:
    if backend == "jax":
        import jax
        from flax import nnx

        leaves = jax.tree_util.tree_leaves_with_path(nnx.state(trainer.model, nnx.Param))
        return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}
    return {name: t.detach().cpu().numpy() for name, t in trainer.model.state_dict().items()}


def _install_pause_hook(trainer, trial_dir: str, step: int, phase: str) -> None:
    """Makes the save of `step` stop at `phase` (see the module docstring) and wait to be killed."""
    import xtrainer.checkpoint as ckpt

    def pause():
        with open(os.path.join(trial_dir, "paused.tmp"), "w") as f:
            f.write(phase)
        os.replace(os.path.join(trial_dir, "paused.tmp"), os.path.join(trial_dir, "paused"))
        time.sleep(600)  # the test kills us here
        raise RuntimeError("kill_worker: the test did not kill the paused job")

    def at_step(directory) -> bool:
        return os.path.basename(os.path.normpath(directory)).endswith(f"-{step}")

    real_save_async = trainer.backend.save_async

    def save_async(state, directory, **kw):
        # Every save of the torch and jax backends starts here (their `save` calls it and runs the
        # returned function at once); an asynchronous save runs that function in the background
        # thread, which is where "backend" pauses then, while the step loop goes on.
        if at_step(directory) and phase == "empty":
            pause()
        finish = real_save_async(state, directory, **kw)
        if not (at_step(directory) and phase == "backend"):
            return finish

        def finish_then_pause():
            finish()
            pause()

        return finish_then_pause

    trainer.backend.save_async = save_async
    real_publish = ckpt.publish_temporary

    def publish_temporary(run_dir, at):
        if phase == "unpublished" and at == step:  # every file written; no manifest, no rename yet
            pause()
        return real_publish(run_dir, at)

    ckpt.publish_temporary = publish_temporary  # this process only: it dies right after


def run_job(backend: str, trial_dir: str, resume: bool = False, pause_at_step: int | None = None,
            pause_phase: str = "backend", cache_dir: str | None = None, async_save: bool = False,
            num_workers: int = 0) -> dict:
    """Trains (or resumes) one job in `trial_dir/out`; writes weights.npz and result.json to trial_dir.

    async_save: checkpoints are written in the background (async_checkpointing=True).

    Progress is appended to `trial_dir/progress` (one line per finished step) so the test can time
    its kills. Returns the result dict.
    """
    started = time.perf_counter()
    import xtrainer

    if backend == "torch":
        import torch

        torch.set_num_threads(1)  # 2 shared cores: threads only add noise at this size
    if backend == "jax" and cache_dir:
        import jax

        # Enabled before the model is built: jax sets its persistent cache up at the first compile, and
        # every run compiles the same programs, so later runs load them instead of compiling.
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    out_dir = os.path.join(trial_dir, "out")
    extra = {"jax_compilation_cache_dir": cache_dir} if backend == "jax" and cache_dir else {}
    if num_workers:  # data-loading worker processes (test_kill9_with_data_workers_resumes_exactly)
        extra["dataloader_num_workers"] = num_workers
    if async_save:
        extra["async_checkpointing"] = True
    info: dict = {"resumed_from": None, "first_step_s": None}
    progress_path = os.path.join(trial_dir, "progress")

    class Progress(xtrainer.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            info["resumed_from"] = state.global_step if resume else None

        def on_step_end(self, args, state, control, **kwargs):
            if info["first_step_s"] is None:
                info["first_step_s"] = time.perf_counter() - started
            with open(progress_path, "a") as f:
                f.write(f"{state.global_step}\n")

    trainer = xtrainer.Trainer(model=job_model(backend), args=job_args(backend, out_dir, **extra),
                               train_dataset=job_data(), callbacks=[Progress()])
    if pause_at_step is not None:
        _install_pause_hook(trainer, trial_dir, pause_at_step, pause_phase)
    trainer.train(resume_from_checkpoint=True if resume else None)
    np.savez(os.path.join(trial_dir, "weights.npz"), **final_weights(trainer, backend))
    result = {
        "log_history": trainer.state.log_history,
        "resumed_from": info["resumed_from"],
        "first_step_s": info["first_step_s"],
        "total_s": time.perf_counter() - started,
        "global_step": trainer.state.global_step,
    }
    with open(os.path.join(trial_dir, "result.json.tmp"), "w") as f:
        json.dump(result, f)
    os.replace(os.path.join(trial_dir, "result.json.tmp"), os.path.join(trial_dir, "result.json"))
    return result


def _import_backend(backend: str) -> None:
    """Imports everything a job needs without creating a device, a thread or an operator."""
    import optax  # noqa: F401
    import torch  # noqa: F401  (training_args.bin is torch.save'd on both backends)

    import xtrainer  # noqa: F401
    from xtrainer.backends.torch import backend as _t  # noqa: F401

    if backend == "jax":
        import flax.nnx  # noqa: F401
        import jax  # noqa: F401
        import orbax.checkpoint  # noqa: F401

        import jax_models  # noqa: F401
        from xtrainer.backends.jax import backend as _j  # noqa: F401


def _preload(modules_file: str) -> None:
    """Imports the modules a finished child imported lazily (transformers pieces, orbax handlers...),
    so later children start with them loaded. Imports start no threads, so forking stays safe."""
    import importlib

    if not os.path.isfile(modules_file):
        return
    with open(modules_file) as f:
        names = json.load(f)
    for name in names:
        if name not in sys.modules and not name.startswith("__"):
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a module that only imports in context: the child imports it
                pass


def _child(request: dict) -> None:
    """Body of a forked child: run one job with its output in trial_dir/log; never returns."""
    code = 1
    try:
        log = os.open(os.path.join(request["trial_dir"], "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        sys.stdin = open(os.devnull)
        before = set(sys.modules)
        run_job(request["backend"], request["trial_dir"], resume=request.get("resume", False),
                pause_at_step=request.get("pause_at_step"), pause_phase=request.get("pause_phase", "backend"),
                cache_dir=request.get("cache_dir"), async_save=request.get("async_save", False),
                num_workers=request.get("num_workers", 0))
        with open(os.path.join(request["trial_dir"], "modules.json"), "w") as f:
            json.dump(sorted(set(sys.modules) - before), f)  # for the server's next children (see serve)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(backend: str) -> None:
    """The fork server: reads one JSON request per line on stdin, answers one JSON line on stdout.

    Requests: {"op": "run", "trial_dir": ..., "resume": bool, "pause_at_step": int|null,
    "pause_phase": str, "cache_dir": str|null} -> {"pid": child pid};
    {"op": "wait", "pid": pid} -> {"exit": exit code, or -signal for a killed child};
    {"op": "poll", "pid": pid} -> {"exit": the same, or null while the child runs}.
    """
    t0 = time.perf_counter()
    _import_backend(backend)
    trial_dirs: dict[int, str] = {}
    reply = sys.stdout
    reply.write(json.dumps({"ready": True, "import_s": time.perf_counter() - t0}) + "\n")
    reply.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = _serve_one(backend, request, trial_dirs)
        except Exception as exc:  # noqa: BLE001 - answer the client rather than die and leave it waiting
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        reply.write(json.dumps(answer) + "\n")
        reply.flush()
    # The client is gone (finished, or its test timed out): end the runs it left behind.
    for pid in list(trial_dirs):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _serve_one(backend: str, request: dict, trial_dirs: dict[int, str]) -> dict:
    """Handles one request of `serve`; the forked child never returns from here."""
    if request["op"] == "run":
        pid = os.fork()
        if pid == 0:
            _child({**request, "backend": backend})
        trial_dirs[pid] = request["trial_dir"]
        return {"pid": pid}
    if request["op"] in ("wait", "poll"):
        done, status = os.waitpid(request["pid"], 0 if request["op"] == "wait" else os.WNOHANG)
        if not done:
            return {"exit": None}
        _preload(os.path.join(trial_dirs.pop(request["pid"]), "modules.json"))
        return {"exit": os.waitstatus_to_exitcode(status)}
    return {"error": f"unknown op {request['op']!r}"}


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "run":
        print(json.dumps(run_job(sys.argv[2], sys.argv[3], resume="--resume" in sys.argv)["log_history"][-1]))
    else:
        sys.exit("usage: kill_worker.py serve {torch,jax} | run {torch,jax} TRIAL_DIR [--resume]")
