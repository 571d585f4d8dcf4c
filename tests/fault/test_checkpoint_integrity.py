"""Checkpoint integrity: manifests verified on load, fallback on resume, rotation, a full disk."""

import errno
import json
import logging
import os

import pytest
import torch

import xtrainer
from helpers import RegressionModel, regression_data
from xtrainer import checkpoint as ckpt
from xtrainer.manifest import MANIFEST_NAME, CheckpointIntegrityError, Verdict, verify_checkpoint, write_manifest

ARGS = dict(per_device_train_batch_size=4, learning_rate=0.05, max_steps=6, save_steps=2, logging_steps=1,
            report_to="none", disable_tqdm=True, seed=3)


def _torch_trainer(out, eval_dataset=None, **overrides):
    args = xtrainer.TrainingArguments(str(out), backend="torch", **{**ARGS, **overrides})
    return xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=regression_data(32),
                            eval_dataset=eval_dataset)


class StepCounter(xtrainer.TrainerCallback):
    """The global steps actually run (a resume from the wrong checkpoint runs others)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _flip_byte(path, offset=-10):
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _checkpoint(tmp_path, files):
    d = tmp_path / "ck"
    for rel, content in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(content)
    write_manifest(str(d))
    return d


def test_manifest_lists_every_file_and_names_the_bad_one(tmp_path):
    d = _checkpoint(tmp_path, {"a.bin": b"x" * 5000, "sub/b.json": b"{}", "c": b""})
    files = json.loads((d / MANIFEST_NAME).read_text())["files"]
    assert sorted(files) == ["a.bin", "c", "sub/b.json"]
    assert files["a.bin"]["size"] == 5000 and len(files["a.bin"]["sha256"]) == 64
    assert verify_checkpoint(str(d)) is Verdict.VERIFIED

    _flip_byte(d / "a.bin")  # same size, other content
    assert verify_checkpoint(str(d), quick=True) is Verdict.VERIFIED  # sizes only
    with pytest.raises(CheckpointIntegrityError, match=r"a\.bin is corrupted: its sha256") as info:
        verify_checkpoint(str(d))
    assert info.value.path == str(d / "a.bin") and "resume_from_checkpoint=True" in str(info.value)
    assert isinstance(info.value, ValueError)  # as the backends' unreadable-file errors

    (d / "a.bin").write_bytes(b"x" * 100)
    with pytest.raises(CheckpointIntegrityError, match=r"a\.bin is truncated or altered: 100 bytes on disk, 5000"):
        verify_checkpoint(str(d), quick=True)
    (d / "a.bin").write_bytes(b"x" * 5000)  # repaired
    os.remove(d / "sub" / "b.json")
    with pytest.raises(CheckpointIntegrityError, match=r"b\.json is missing"):
        verify_checkpoint(str(d))
    (d / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CheckpointIntegrityError, match="manifest .* is unreadable"):
        verify_checkpoint(str(d))
    os.remove(d / MANIFEST_NAME)
    assert verify_checkpoint(str(d)) is Verdict.NO_MANIFEST


def test_resume_skips_damaged_checkpoints_and_explicit_path_fails(tmp_path, caplog):
    out = tmp_path / "run"
    full = _torch_trainer(out)
    full.train()
    expected = {k: v.clone() for k, v in full.model.state_dict().items()}
    for step in (2, 4, 6):
        assert verify_checkpoint(str(out / f"checkpoint-{step}")) is Verdict.VERIFIED
    _flip_byte(out / "checkpoint-6" / "model.safetensors")
    with open(out / "checkpoint-4" / "optimizer.pt", "r+b") as f:
        f.truncate(40)

    with pytest.raises(CheckpointIntegrityError, match=r"checkpoint-6.model\.safetensors is corrupted"):
        _torch_trainer(out).train(resume_from_checkpoint=str(out / "checkpoint-6"))

    resumed = _torch_trainer(out)
    resumed.add_callback(steps_run := StepCounter())
    with pytest.warns(UserWarning) as record, caplog.at_level(logging.WARNING, logger="xtrainer.checkpoint"):
        resumed.train(resume_from_checkpoint=True)
    messages = [str(w.message) for w in record if "Skipping checkpoint" in str(w.message)]
    assert len(messages) == 2
    assert "checkpoint-6" in messages[0] and "model.safetensors is corrupted" in messages[0]
    assert "checkpoint-4" in messages[1] and "optimizer.pt is truncated" in messages[1]
    assert sum("Skipping checkpoint" in r.getMessage() for r in caplog.records) == 2
    # It resumed from checkpoint-2 (4 steps left) and reached the uninterrupted run's weights.
    assert steps_run.steps == [3, 4, 5, 6]
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)


def test_resume_without_manifest_loads_with_info_log(tmp_path, caplog):
    out = tmp_path / "run"
    _torch_trainer(out, max_steps=2).train()
    os.remove(out / "checkpoint-2" / MANIFEST_NAME)  # as transformers writes it
    trainer = _torch_trainer(out, max_steps=4)
    with caplog.at_level(logging.INFO, logger="xtrainer.checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    assert any("has no xtrainer_manifest.json" in r.getMessage() for r in caplog.records)
    assert trainer.state.global_step == 4


def test_every_candidate_damaged_is_an_error(tmp_path):
    out = tmp_path / "run"
    _torch_trainer(out, max_steps=2).train()
    _flip_byte(out / "checkpoint-2" / "trainer_state.json", offset=-3)
    with pytest.warns(UserWarning, match="Skipping checkpoint"):
        with pytest.raises(CheckpointIntegrityError, match="no checkpoint in output_dir=.* verifies"):
            ckpt.resolve_resume_checkpoint(True, str(out))


def test_load_best_model_at_end_verifies_the_best_checkpoint(tmp_path):
    class CorruptBest(xtrainer.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 6:  # the end: damage the best one before it is loaded back
                _flip_byte(os.path.join(state.best_model_checkpoint, "model.safetensors"))

    trainer = _torch_trainer(
        tmp_path / "run", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
        metric_for_best_model="loss", greater_is_better=True,  # the first evaluation stays the best
        eval_dataset=regression_data(8, seed=1),
    )
    trainer.add_callback(CorruptBest())
    with pytest.raises(CheckpointIntegrityError, match=r"checkpoint-2.model\.safetensors is corrupted"):
        trainer.train()


def _fake_run(tmp_path, steps):
    for s in steps:
        d = tmp_path / f"checkpoint-{s}"
        d.mkdir()
        (d / "trainer_state.json").write_text("{}")
        (d / "weights").write_bytes(b"w" * 64)
        write_manifest(str(d))


@pytest.mark.parametrize(
    "limit,best,truncated,expected_left",
    [
        (2, None, [], [3, 4]),
        (1, None, [4], [3, 4]),  # the newest is damaged: the newest good one survives too
        (2, None, [3, 4], [2, 4]),  # the newest good one counts toward the limit
        (2, 1, [4], [1, 3, 4]),  # the best one and the newest good one
        (1, 1, [], [1, 4]),
        (3, 1, [], [1, 3, 4]),
    ],
)
def test_rotation_keeps_newest_verified_and_best(tmp_path, limit, best, truncated, expected_left):
    _fake_run(tmp_path, [1, 2, 3, 4])
    for s in truncated:
        with open(tmp_path / f"checkpoint-{s}" / "weights", "r+b") as f:
            f.truncate(10)
    best_path = str(tmp_path / f"checkpoint-{best}") if best else None
    ckpt.rotate_checkpoints(str(tmp_path), limit, best_path)
    assert sorted(int(n.split("-")[1]) for n in os.listdir(tmp_path)) == expected_left


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _assert_disk_full_left_earlier_intact(exc_info, out, step=4, earlier=("checkpoint-2",)):
    message = str(exc_info.value)
    assert "disk is full" in message and f"checkpoint-{step}" in message and "resume_from_checkpoint=True" in message
    assert exc_info.value.errno == errno.ENOSPC and exc_info.value.step == step
    assert sorted(os.listdir(out)) == list(earlier)  # no tmp-checkpoint-N, no checkpoint-N
    for name in earlier:
        assert verify_checkpoint(str(out / name)) is Verdict.VERIFIED


def test_full_disk_during_torch_save(tmp_path, monkeypatch):
    from xtrainer.backends.torch import state_io

    original = torch.save

    def save(obj, path, *args, **kwargs):
        # Fails in the middle of checkpoint-4: after model.safetensors, at the optimizer state.
        if "tmp-checkpoint-4" in str(path) and str(path).endswith("optimizer.pt"):
            with open(path, "wb") as f:
                f.write(b"partial")
            _disk_full()
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(state_io.torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(ckpt.CheckpointDiskFullError) as info:
        _torch_trainer(out).train()
    _assert_disk_full_left_earlier_intact(info, out)


def test_full_disk_during_jax_save_then_resume_skips_a_corrupt_orbax_file(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp
    from flax import nnx

    from jax_models import RegressionMLP, regression_rows

    original = ocp.StandardCheckpointer.wait_until_finished

    def wait(self):
        # orbax has written checkpoint-6's arrays when the disk fills up (e.g. on its metadata).
        original(self)
        if any(n.startswith("tmp-checkpoint-6") for n in os.listdir(out)):
            _disk_full()

    monkeypatch.setattr(ocp.StandardCheckpointer, "wait_until_finished", wait)
    out = tmp_path / "run"
    args = xtrainer.TrainingArguments(str(out), backend="jax", **ARGS)
    trainer = xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=args, train_dataset=regression_rows(32))
    with pytest.raises(ckpt.CheckpointDiskFullError) as info:
        trainer.train()
    _assert_disk_full_left_earlier_intact(info, out, step=6, earlier=["checkpoint-2", "checkpoint-4"])
    monkeypatch.undo()

    files = json.loads((out / "checkpoint-4" / MANIFEST_NAME).read_text())["files"]
    orbax_files = [n for n in files if n.startswith("jax_state/")]
    assert orbax_files  # orbax's files are in the manifest
    _flip_byte(out / "checkpoint-4" / max(orbax_files, key=lambda n: files[n]["size"]), offset=-1)
    resumed = xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=args, train_dataset=regression_rows(32))
    resumed.add_callback(steps_run := StepCounter())
    with pytest.warns(UserWarning, match=r"checkpoint-4.*is corrupted"):
        resumed.train(resume_from_checkpoint=True)
    assert steps_run.steps == [3, 4, 5, 6]  # from checkpoint-2
    assert verify_checkpoint(str(out / "checkpoint-6")) is Verdict.VERIFIED


def _reshard(checkpoint):
    """Rewrites model.safetensors as an index and one shard per tensor (what a user's re-save does)."""
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(checkpoint, "model.safetensors"))
    os.remove(os.path.join(checkpoint, "model.safetensors"))
    shards = {name: f"model-{i + 1:05d}-of-{len(state):05d}.safetensors" for i, name in enumerate(state)}
    for name, shard in shards.items():
        save_file({name: state[name].contiguous()}, os.path.join(checkpoint, shard), metadata={"format": "pt"})
    with open(os.path.join(checkpoint, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": shards}, f)
    return shards


def test_weights_resharded_after_the_save_resume_and_the_rest_is_still_verified(tmp_path, caplog):
    full = _torch_trainer(tmp_path / "run", max_steps=6, save_steps=3)
    full.train()
    checkpoint = str(tmp_path / "run" / "checkpoint-3")
    shards = _reshard(checkpoint)
    with caplog.at_level(logging.WARNING, logger="xtrainer"):
        assert verify_checkpoint(checkpoint) is Verdict.VERIFIED
    assert "were rewritten after the checkpoint was saved" in caplog.text
    resumed = _torch_trainer(tmp_path / "run", max_steps=6, save_steps=3)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert (resumed.model.a.item(), resumed.model.b.item()) == (full.model.a.item(), full.model.b.item())

    os.remove(os.path.join(checkpoint, sorted(shards.values())[0]))  # an incomplete set is still refused
    with pytest.raises(CheckpointIntegrityError, match=r"model\.safetensors is missing"):
        verify_checkpoint(checkpoint)
    (tmp_path / "run" / "checkpoint-6" / "model.safetensors").unlink()  # deleted weights: refused
    with pytest.raises(CheckpointIntegrityError, match=r"model\.safetensors is missing"):
        verify_checkpoint(str(tmp_path / "run" / "checkpoint-6"))
