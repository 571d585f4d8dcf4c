"""checkpoint.py: atomic publication, rotation keeping the best, resume-path resolution."""

import os

import pytest

from xtrainer import checkpoint as ckpt
from xtrainer.trainer_utils import get_last_checkpoint


def _make(run, steps):
    for s in steps:
        os.makedirs(run / f"checkpoint-{s}")
        (run / f"checkpoint-{s}" / "trainer_state.json").write_text("{}")


def test_atomic_checkpoint_publishes_only_on_success(tmp_path):
    with ckpt.atomic_checkpoint(str(tmp_path), 5) as tmp:
        assert os.path.basename(tmp) == "tmp-checkpoint-5"
        (tmp_path / "tmp-checkpoint-5" / "f").write_text("x")
        assert get_last_checkpoint(str(tmp_path)) is None  # not visible while being written
    assert (tmp_path / "checkpoint-5" / "f").read_text() == "x"
    with pytest.raises(RuntimeError):
        with ckpt.atomic_checkpoint(str(tmp_path), 6):
            raise RuntimeError("crash in the middle of a save")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-5"]


def test_resave_same_step_replaces(tmp_path):
    for content in ("a", "b"):
        with ckpt.atomic_checkpoint(str(tmp_path), 1) as tmp:
            open(os.path.join(tmp, "f"), "w").write(content)
    assert (tmp_path / "checkpoint-1" / "f").read_text() == "b"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]


def test_leftover_temporary_is_ignored_and_cleaned(tmp_path):
    _make(tmp_path, [3])
    os.makedirs(tmp_path / "tmp-checkpoint-6")
    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-3")
    ckpt.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3"]


@pytest.mark.parametrize(
    "limit,best,expected_deleted",
    [
        (2, None, [1, 2]),
        (2, 1, [2, 3]),
        (1, 2, [1, 3]),
        (1, 4, [1, 2, 3]),
        (None, 1, []),
        (5, None, []),
    ],
)
def test_rotation_keeps_newest_and_best(tmp_path, limit, best, expected_deleted):
    _make(tmp_path, [1, 2, 3, 4])
    best_path = str(tmp_path / f"checkpoint-{best}") if best else None
    deleted = ckpt.rotate_checkpoints(str(tmp_path), limit, best_path)
    assert [int(p.rsplit("-", 1)[1]) for p in deleted] == expected_deleted
    left = {int(n.split("-")[1]) for n in os.listdir(tmp_path)}
    assert left == {1, 2, 3, 4} - set(expected_deleted)


def test_resolve_resume_checkpoint(tmp_path):
    assert ckpt.resolve_resume_checkpoint(None, str(tmp_path)) is None
    with pytest.raises(ValueError, match="No valid checkpoint found in output directory"):
        ckpt.resolve_resume_checkpoint(True, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.resolve_resume_checkpoint(str(tmp_path / "nope"), str(tmp_path))
    os.makedirs(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.resolve_resume_checkpoint(str(tmp_path / "checkpoint-2"), str(tmp_path))
    _make(tmp_path, [7, 10])
    assert ckpt.resolve_resume_checkpoint(True, str(tmp_path)).endswith("checkpoint-10")
