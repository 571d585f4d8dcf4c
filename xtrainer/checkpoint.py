"""The `checkpoint-{step}/` layout on disk: atomic publication, rotation, and locating checkpoints.

A checkpoint is written into `tmp-checkpoint-{step}/` and renamed to `checkpoint-{step}/` only once
every file is on disk, so a crash in the middle of a save never leaves a directory that resume or
rotation would mistake for a complete checkpoint. What goes *inside* the directory is the backend's
business (model, optimizer, RNG) plus the front's `trainer_state.json` and `training_args.bin`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
from collections.abc import Callable, Iterator

from .trainer_utils import PREFIX_CHECKPOINT_DIR, checkpoint_step, sorted_checkpoints

TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.bin"
_TMP_PREFIX = "tmp-" + PREFIX_CHECKPOINT_DIR


def checkpoint_dir_name(step: int) -> str:
    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


def _fsync_tree(root: str) -> None:
    """Flushes every file and directory under root to disk before the publishing rename."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_checkpoint(
    run_dir: str, step: int, *, is_main: bool = True, barrier: Callable[[], None] = lambda: None
) -> Iterator[str]:
    """Yields a temporary directory to write checkpoint `step` into; publishes it on success.

    Every process writes into the same temporary directory (sharded state); process 0 creates it
    and renames it once all processes are done. On an exception the temporary directory is removed
    and earlier checkpoints are untouched.

    Args:
        run_dir: the output directory holding the checkpoint-N directories.
        step: the global step being saved.
        is_main: whether this process creates and publishes the directory.
        barrier: waits for all processes (distributed runs).
    """
    final = os.path.join(run_dir, checkpoint_dir_name(step))
    tmp = os.path.join(run_dir, f"{_TMP_PREFIX}-{step}")
    if is_main:
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise NotADirectoryError(f"output_dir {run_dir} exists and is not a directory.")
        os.makedirs(run_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash in an earlier save
        os.makedirs(tmp)
    barrier()
    try:
        yield tmp
        barrier()
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_main:
        _fsync_tree(tmp)
        if os.path.exists(final):  # re-saving the same step: move the old copy aside first
            stale = final + ".stale"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
    barrier()


def remove_stale_temporaries(run_dir: str) -> None:
    """Deletes temporary checkpoint directories that a crashed save left behind."""
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        if name.startswith(_TMP_PREFIX + "-"):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def checkpoints_to_delete(checkpoints: list[str], save_total_limit: int | None, best: str | None) -> list[str]:
    """Which of `checkpoints` (oldest first) rotation deletes.

    Keeps the newest `save_total_limit` ones and always the best one; with a limit of 1 and a best
    checkpoint that is not the newest, both are kept (so training can still resume).
    """
    if not save_total_limit or save_total_limit <= 0 or len(checkpoints) <= save_total_limit:
        return []
    best_path = os.path.normpath(best) if best else None
    keep_best = best_path is not None and any(os.path.normpath(c) == best_path for c in checkpoints)
    limit = save_total_limit
    if keep_best and limit == 1 and os.path.normpath(checkpoints[-1]) != best_path:
        limit = 2
    candidates = [c for c in checkpoints if not (keep_best and os.path.normpath(c) == best_path)]
    keep_newest = limit - (1 if keep_best else 0)
    doomed = candidates[: max(0, len(candidates) - keep_newest)]
    return doomed


def rotate_checkpoints(run_dir: str, save_total_limit: int | None, best: str | None) -> list[str]:
    """Deletes old checkpoints beyond save_total_limit (never the best one); returns what it deleted."""
    doomed = checkpoints_to_delete(sorted_checkpoints(run_dir), save_total_limit, best)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def save_training_args(args, directory: str) -> None:
    """Writes training_args.bin (torch.save format when torch is installed, as transformers does)."""
    path = os.path.join(directory, TRAINING_ARGS_NAME)
    try:
        import torch
    except ImportError:
        with open(path, "wb") as f:
            pickle.dump(args, f)
        return
    torch.save(args, path)


def resolve_resume_checkpoint(resume_from_checkpoint, output_dir: str) -> str | None:
    """The checkpoint directory that `train(resume_from_checkpoint=...)` means.

    Raises:
        ValueError / FileNotFoundError: nothing to resume from, with the path that was searched.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        checkpoints = sorted_checkpoints(output_dir)
        if not checkpoints:
            raise ValueError(
                f"resume_from_checkpoint=True but no checkpoint-N directory was found in output_dir={output_dir!r}."
            )
        return checkpoints[-1]
    path = os.fspath(resume_from_checkpoint)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"resume_from_checkpoint={path!r} does not exist (or is not a directory).")
    if not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
        raise ValueError(
            f"resume_from_checkpoint={path!r} is not a complete checkpoint: it has no {TRAINER_STATE_NAME}."
        )
    return path


__all__ = [
    "TRAINER_STATE_NAME",
    "TRAINING_ARGS_NAME",
    "atomic_checkpoint",
    "checkpoint_dir_name",
    "checkpoint_step",
    "checkpoints_to_delete",
    "remove_stale_temporaries",
    "resolve_resume_checkpoint",
    "rotate_checkpoints",
    "save_training_args",
]
