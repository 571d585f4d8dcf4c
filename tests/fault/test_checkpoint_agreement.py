"""The save protocol of checkpoint_writer.py, with two processes simulated by two threads, and the
pieces of the multi-process fault story that run in one process: asynchronous saves, the
preemption agreement's timing, and the error a surviving process raises.

The real multi-process runs are in test_faults_at_scale.py and test_chaos.py (slow set)."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest
import torch

import xtrainer
from helpers import RegressionModel, regression_data
from xtrainer import checkpoint as ckpt
from xtrainer.checkpoint_writer import CheckpointWriter
from xtrainer.manifest import MANIFEST_NAME, Verdict, verify_checkpoint
from xtrainer.peer_failure import PeerProcessFailure, is_peer_failure, peer_failure_error


class _Hub:
    """What the processes' `exchange` goes through: every value of one tag, once all arrived."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=20)
        self.values: dict = {}
        self.lock = threading.Lock()

    def exchange(self, rank: int, tag: str, value):
        with self.lock:
            self.values.setdefault(tag, [None] * self.world)[rank] = value
        self.barrier.wait()
        return list(self.values[tag])


class _FakeBackend:
    """Writes one file per process (`part-<rank>.bin`) the way a backend writes its share."""

    name = "fake"

    def __init__(self, rank: int, hub: _Hub, fail_at: dict | None = None):
        self.process_index, self.num_processes, self.hub, self.fail_at = rank, hub.world, hub, fail_at or {}

    def save_async(self, state, directory, *, save_only_model=False, outcome_tag=None, background=True):
        step = int(os.path.basename(directory).rsplit("-", 1)[1])
        path = os.path.join(directory, f"part-{self.process_index}.bin")

        def finish():
            with open(path, "wb") as f:
                f.write(b"x" * 100)
                if self.fail_at.get(step) is not None:
                    raise OSError(self.fail_at[step], os.strerror(self.fail_at[step]), path)

        return finish

    def exchange(self, tag, value):
        return self.hub.exchange(self.process_index, tag, value)

    def barrier(self):
        self.hub.barrier.wait()


def _front_files(tmp):
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        f.write("{}")


def _save_on_every_rank(writers, step, *, wait=False):
    """Runs writer.save(step) on each simulated process; returns each one's exception (or None)."""
    errors = [None] * len(writers)

    def one(rank):
        try:
            writers[rank].save(step, None, save_only_model=False, write_front_files=_front_files)
            if wait:
                writers[rank].wait()
        except Exception as exc:  # noqa: BLE001
            errors[rank] = exc

    threads = [threading.Thread(target=one, args=(r,)) for r in range(len(writers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize("code,kind", [(errno.ENOSPC, ckpt.CheckpointDiskFullError), (errno.EIO, ckpt.CheckpointWriteError)])
def test_a_write_failing_on_one_process_fails_the_save_on_every_process(tmp_path, code, kind, asynchronous):
    hub = _Hub(2)
    backends = [_FakeBackend(0, hub), _FakeBackend(1, hub, fail_at={4: code})]
    writers = [CheckpointWriter(b, str(tmp_path), asynchronous=asynchronous) for b in backends]
    assert _save_on_every_rank(writers, 2, wait=True) == [None, None]
    errors = _save_on_every_rank(writers, 4, wait=True)  # async: the error comes at the wait
    assert all(isinstance(e, kind) for e in errors), errors
    assert str(errors[0]) == str(errors[1])  # the same error, on every process
    failed_file = str(tmp_path / "tmp-checkpoint-4" / "part-1.bin")
    assert errors[0].rank == errors[1].rank == 1 and errors[0].path == failed_file and errors[0].step == 4
    assert "failed on process 1" in str(errors[0]) and failed_file in str(errors[0])
    assert isinstance(errors[1].__cause__, OSError)  # the failing process keeps the original error as cause
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]  # nothing published, the temporary removed
    assert verify_checkpoint(str(tmp_path / "checkpoint-2")) is Verdict.VERIFIED
    assert sorted(os.listdir(tmp_path / "checkpoint-2")) == sorted([MANIFEST_NAME, "part-0.bin", "part-1.bin", "trainer_state.json"])


def test_a_failed_publication_fails_the_save_on_every_process(tmp_path, monkeypatch):
    hub = _Hub(2)
    writers = [CheckpointWriter(_FakeBackend(r, hub), str(tmp_path)) for r in range(2)]
    real = ckpt.write_manifest

    def full_disk_manifest(directory):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(directory, MANIFEST_NAME))

    monkeypatch.setattr(ckpt, "write_manifest", full_disk_manifest)
    errors = _save_on_every_rank(writers, 3)
    assert all(isinstance(e, ckpt.CheckpointDiskFullError) and e.rank == 0 for e in errors), errors
    assert errors[0].path.endswith(f"tmp-checkpoint-3/{MANIFEST_NAME}")
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(ckpt, "write_manifest", real)
    assert _save_on_every_rank(writers, 3) == [None, None]
    assert verify_checkpoint(str(tmp_path / "checkpoint-3")) is Verdict.VERIFIED


# ---------------------------------------------------------------- asynchronous saves, one process


def _torch_trainer(out, **overrides):
    args = xtrainer.TrainingArguments(str(out), backend="torch", per_device_train_batch_size=4, learning_rate=0.05,
                                      max_steps=6, save_steps=2, logging_steps=1, report_to="none",
                                      disable_tqdm=True, seed=3, **overrides)
    return xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=regression_data(32))


def test_async_torch_checkpoints_equal_synchronous_ones(tmp_path):
    from safetensors.torch import load_file

    sync, asyn = _torch_trainer(tmp_path / "sync"), _torch_trainer(tmp_path / "async", async_checkpointing=True)
    handed_off = []

    class OnSave(xtrainer.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            handed_off.append(state.global_step)

    asyn.add_callback(OnSave())
    sync.train()
    asyn.train()
    assert handed_off == [2, 4, 6]
    for step in (2, 4, 6):
        a, b = tmp_path / "sync" / f"checkpoint-{step}", tmp_path / "async" / f"checkpoint-{step}"
        assert verify_checkpoint(str(b)) is Verdict.VERIFIED
        assert sorted(os.listdir(a)) == sorted(os.listdir(b))
        for name, tensor in load_file(str(a / "model.safetensors")).items():
            assert torch.equal(tensor, load_file(str(b / "model.safetensors"))[name])
        oa, ob = torch.load(a / "optimizer.pt"), torch.load(b / "optimizer.pt")
        # The copy was taken at the save: later steps (which update the moments in place) did not leak in.
        for index, slots in oa["state"].items():
            for key, value in slots.items():
                assert torch.equal(value, ob["state"][index][key]), (step, index, key)
    assert asyn.model.a.item() == sync.model.a.item()


def test_an_async_save_error_surfaces_at_the_next_save_and_nothing_is_published(tmp_path, monkeypatch):
    from xtrainer.backends.torch import save_snapshot

    real = torch.save
    written = threading.Event()

    def save(obj, path, *args, **kwargs):
        if "tmp-checkpoint-4" in str(path) and str(path).endswith("optimizer.pt"):
            assert threading.current_thread() is not threading.main_thread()  # written in the background
            written.set()
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(save_snapshot.torch, "save", save)
    trainer = _torch_trainer(tmp_path, async_checkpointing=True)
    steps = []

    class Steps(xtrainer.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    trainer.add_callback(Steps())
    with pytest.raises(ckpt.CheckpointDiskFullError, match=r"saving checkpoint-4 failed on process 0, writing .*optimizer\.pt"):
        trainer.train()
    assert written.is_set() and steps == [1, 2, 3, 4, 5, 6]  # training went on while checkpoint-4 was written
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]
    assert verify_checkpoint(str(tmp_path / "checkpoint-2")) is Verdict.VERIFIED


def test_async_jax_checkpoints_restore_bitwise_like_synchronous_ones(tmp_path):
    import jax
    from flax import nnx

    from jax_models import RegressionMLP, regression_rows
    from xtrainer.backends.jax import state_io

    def trainer(out, **overrides):
        args = xtrainer.TrainingArguments(str(out), backend="jax", per_device_train_batch_size=2, max_steps=4,
                                          save_steps=2, logging_steps=1, report_to="none", disable_tqdm=True,
                                          **overrides)
        return xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=args, train_dataset=regression_rows(64))

    sync, asyn = trainer(tmp_path / "sync"), trainer(tmp_path / "async", async_checkpointing=True)
    sync.train()
    asyn.train()
    template = {k: v for k, v in sync._backend_state.items() if k != "nan"}

    def host(tree):
        return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
                for x in jax.tree.leaves(tree)]

    for step in (2, 4):
        assert verify_checkpoint(str(tmp_path / "async" / f"checkpoint-{step}")) is Verdict.VERIFIED
        a = host(state_io.restore_state(template, str(tmp_path / "sync" / f"checkpoint-{step}")))
        b = host(state_io.restore_state(template, str(tmp_path / "async" / f"checkpoint-{step}")))
        assert all(np.array_equal(x, y) for x, y in zip(a, b)), step


# ---------------------------------------------------------------- preemption agreement, dead peers


def test_the_preemption_agreement_is_read_one_step_late_and_the_same_everywhere(monkeypatch):
    """Process 0's view of the per-step all-reduce; process 1 gets SIGTERM during step 3."""
    from xtrainer.backends.torch import coordination

    remote = {1: 0, 2: 0, 3: 1, 4: 1, 5: 1}  # process 1's flag as launched at the end of each step
    launched = []

    class Work:
        def wait(self):
            pass

    def all_reduce(flag, op, group, async_op):
        assert async_op and group == "preemption group"
        launched.append(int(flag.item()))
        flag.fill_(max(int(flag.item()), remote[len(launched)]))
        return Work()

    monkeypatch.setattr(coordination.dist, "all_reduce", all_reduce)
    agreement = coordination.PreemptionAgreement("preemption group")
    answers = [agreement.at_step(local_flag=False) for _ in range(4)]
    assert answers == [False, False, False, True]  # step 3's reduction saw the signal; read at step 4
    assert launched == [0, 0, 0]  # no reduction is launched once everyone stops
    assert agreement.at_end() is False


def test_a_dead_peer_is_reported_clearly(tmp_path):
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:40862. This is typically caused by a remote worker crashing.")
    assert is_peer_failure(gloo)
    wrapped = RuntimeError("the step failed")
    wrapped.__cause__ = gloo
    assert is_peer_failure(wrapped)
    assert not is_peer_failure(ValueError("shape mismatch"))
    (tmp_path / "checkpoint-4").mkdir()
    error = peer_failure_error(gloo, rank=0, processes=2, step=7, output_dir=str(tmp_path))
    assert isinstance(error, PeerProcessFailure) and error.step == 7 and error.rank == 0
    message = str(error)
    assert "Another process of this 2-process run stopped" in message and "at step 7" in message
    assert str(tmp_path / "checkpoint-4") in message and "Restart all 2 processes with resume_from_checkpoint=True" in message
    assert "Connection closed by peer" in message
