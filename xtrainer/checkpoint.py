"""The `checkpoint-{step}/` layout on disk: atomic publication, rotation, and locating checkpoints.

A checkpoint is written into `tmp-checkpoint-{step}/` and renamed to `checkpoint-{step}/` only once
every file is on disk, so a crash in the middle of a save never leaves a directory that resume or
rotation would mistake for a complete checkpoint. What goes *inside* the directory is the backend's
business (model, optimizer, RNG) plus the front's `trainer_state.json` and `training_args.bin`.

Integrity: the last file written before publication is a manifest (manifest.py) with the size and
sha256 of every file. Resuming verifies it: `resume_from_checkpoint=True` falls back to the newest
checkpoint that verifies (with a warning per skipped one), an explicit path that fails raises.
Rotation never deletes the newest verified checkpoint nor the best one.

A failed save removes its temporary directory and every process raises the same error, built from
every process's report (`describe_save_failure` -> `save_failure_error`): `CheckpointDiskFullError`
for a full disk, `CheckpointWriteError` otherwise, naming the process and the file that failed
(`writing(path)` records the file on errors that do not say). The Trainer's save protocol around
these pieces (several processes, asynchronous saves) is checkpoint_writer.py.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import shutil
import warnings
from collections.abc import Callable, Iterator

from .manifest import MANIFEST_NAME, CheckpointIntegrityError, Verdict, verify_checkpoint, write_manifest
from .trainer_utils import PREFIX_CHECKPOINT_DIR, checkpoint_step, sorted_checkpoints

logger = logging.getLogger(__name__)

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


def temporary_dir(run_dir: str, step: int) -> str:
    """Where checkpoint `step` is written before it is published."""
    return os.path.join(run_dir, f"{_TMP_PREFIX}-{step}")


def prepare_temporary(run_dir: str, step: int) -> str:
    """Creates an empty temporary directory for checkpoint `step` (process 0 only); returns it.

    A temporary directory of the same step left by a crashed save is removed first.
    """
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise NotADirectoryError(f"output_dir {run_dir} exists and is not a directory.")
    os.makedirs(run_dir, exist_ok=True)
    tmp = temporary_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def publish_temporary(run_dir: str, step: int) -> str:
    """Writes the manifest (the last file), flushes everything, and renames the temporary directory
    to checkpoint-{step} (process 0 only, once every process finished writing); returns the final path.

    Re-saving a step that already has a checkpoint moves the old copy aside first, so there is never
    a moment without a complete checkpoint-{step}.
    """
    tmp, final = temporary_dir(run_dir, step), os.path.join(run_dir, checkpoint_dir_name(step))
    with writing(os.path.join(tmp, MANIFEST_NAME)):
        write_manifest(tmp)  # it lists every file the other processes and the backend wrote
    _fsync_tree(tmp)
    if os.path.exists(final):
        stale = final + ".stale"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def discard_temporary(run_dir: str, step: int) -> None:
    """Removes the temporary directory of a failed save; published checkpoints are untouched."""
    shutil.rmtree(temporary_dir(run_dir, step), ignore_errors=True)


@contextlib.contextmanager
def atomic_checkpoint(
    run_dir: str, step: int, *, is_main: bool = True, barrier: Callable[[], None] = lambda: None
) -> Iterator[str]:
    """Yields a temporary directory to write checkpoint `step` into; publishes it on success.

    The one-process form of what checkpoint_writer.CheckpointWriter does for the Trainer (which
    also agrees with the other processes on the outcome and can finish in the background):
    process 0 creates the directory and renames it once all processes are done, after writing the
    manifest (every file's size and sha256) as the last file. On an exception the temporary
    directory is removed and earlier checkpoints are untouched.

    Args:
        run_dir: the output directory holding the checkpoint-N directories.
        step: the global step being saved.
        is_main: whether this process creates and publishes the directory.
        barrier: waits for all processes (distributed runs).

    Raises:
        CheckpointDiskFullError: the save ran out of disk space (the original error is its cause).
    """
    tmp = temporary_dir(run_dir, step)
    if is_main:
        prepare_temporary(run_dir, step)
    barrier()
    try:
        yield tmp
        barrier()
        if is_main:
            publish_temporary(run_dir, step)
    except BaseException as exc:
        if is_main:
            discard_temporary(run_dir, step)
        if _is_disk_full(exc):
            raise save_failure_error(step, run_dir, [describe_save_failure(exc, rank=0)]) from exc
        raise
    barrier()


class CheckpointDiskFullError(OSError):
    """Saving a checkpoint ran out of disk space (ENOSPC / EDQUOT).

    Attributes:
        step: the checkpoint that failed.
        rank: the process whose write failed (0 on one process), when known.
        path: the file being written when it failed, when known.
    """

    def __init__(self, message: str, *, step: int, rank: int | None = None, path: str | None = None):
        super().__init__(errno.ENOSPC, message)
        self.step, self.rank, self.path = step, rank, path

    def __str__(self) -> str:
        return self.strerror


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed on some process for another reason than a full disk (an I/O error,
    a permission, a lost mount...). Every process of the run raises the same error.

    Attributes:
        step: the checkpoint that failed.
        rank: the process whose write failed.
        path: the file being written when it failed, when known.
    """

    def __init__(self, message: str, *, step: int, rank: int | None = None, path: str | None = None,
                 error_number: int | None = None):
        super().__init__(error_number or errno.EIO, message)
        self.step, self.rank, self.path = step, rank, path

    def __str__(self) -> str:
        return self.strerror


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Names `path` on any exception raised while writing it, for the error every process reports.

    Writers (torch.save, safetensors, orbax) often fail without saying which file; this records it
    on the exception (`checkpoint_file`) unless an inner `writing` already did.
    """
    try:
        yield
    except Exception as exc:
        if getattr(exc, "checkpoint_file", None) is None:
            try:
                exc.checkpoint_file = path
            except AttributeError:  # an exception type without a __dict__
                pass
        raise


def _failing_path(exc: BaseException) -> str | None:
    """The file a failed write was writing: an OSError's own filename (the most precise), else the
    one `writing` recorded."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for link in chain:
        if isinstance(link, OSError) and link.filename:
            return os.fspath(link.filename)
    for link in chain:
        if getattr(link, "checkpoint_file", None):
            return os.fspath(link.checkpoint_file)
    return None


class PeerSaveFailed(RuntimeError):
    """Raised on a process whose own writes were fine when another process's save failed first."""


def describe_save_failure(exc: BaseException, *, rank: int) -> dict:
    """What one process reports to the others about its failed save (plain JSON values)."""
    first_line = (str(exc).strip().splitlines() or [""])[0][:500]
    return {
        "rank": rank,
        "path": _failing_path(exc),
        "disk_full": _is_disk_full(exc),
        "errno": exc.errno if isinstance(exc, OSError) and isinstance(exc.errno, int) else None,
        "error": f"{type(exc).__name__}: {first_line}",
        "consequence": isinstance(exc, PeerSaveFailed) or _wraps(exc, PeerSaveFailed),
    }


def _wraps(exc: BaseException, kind: type) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, kind):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def save_failure_error(step: int, run_dir: str, failures: list[dict]) -> OSError:
    """The one error every process raises for a failed save, built from every process's report.

    The root cause is the first failure (lowest rank) that is not only a reaction to another
    process's failure; the others are listed after it.
    """
    failures = sorted(failures, key=lambda f: (f["consequence"], f["rank"]))
    root = failures[0]
    where = f"process {root['rank']}" + (f", writing {root['path']}" if root["path"] else "")
    others = "".join(f"; process {f['rank']}: {f['error']}" for f in failures[1:] if not f["consequence"])
    stopped = [str(f["rank"]) for f in failures[1:] if f["consequence"]]
    if stopped:
        others += f"; process{'es' if len(stopped) > 1 else ''} {', '.join(stopped)} stopped waiting for it"
    name = checkpoint_dir_name(step)
    advice = (
        f"No process published {name}: its partial directory was removed and the earlier checkpoints in "
        f"{run_dir} are intact. Resume with resume_from_checkpoint=True."
    )
    if root["disk_full"]:
        message = (f"The disk is full: saving {name} failed on {where} ({root['error']}{others}). "
                   f"{advice} Free space on {run_dir} (or lower save_total_limit) first.")
        return CheckpointDiskFullError(message, step=step, rank=root["rank"], path=root["path"])
    message = f"Saving {name} failed on {where}: {root['error']}{others}. {advice}"
    return CheckpointWriteError(message, step=step, rank=root["rank"], path=root["path"], error_number=root["errno"])


def _is_disk_full(exc: BaseException) -> bool:
    """Whether exc, or an exception it wraps (orbax and tensorstore re-raise), is a full disk."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def remove_stale_temporaries(run_dir: str) -> None:
    """Deletes temporary checkpoint directories that a crashed save left behind."""
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        if name.startswith(_TMP_PREFIX + "-"):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def checkpoints_to_delete(
    checkpoints: list[str], save_total_limit: int | None, best: str | None, protect: tuple[str | None, ...] = ()
) -> list[str]:
    """Which of `checkpoints` (oldest first) rotation deletes.

    Keeps the newest `save_total_limit` ones, always the best one and any in `protect` (rotation
    passes the newest checkpoint that verifies). The protected ones count toward the limit, but the
    newest checkpoint is always kept as well: with a limit of 1 and a best checkpoint that is not
    the newest, both are kept (so training can still resume).
    """
    if not save_total_limit or save_total_limit <= 0 or len(checkpoints) <= save_total_limit:
        return []
    present = {os.path.normpath(c) for c in checkpoints}
    protected = {os.path.normpath(p) for p in (best, *protect) if p} & present
    others = [c for c in checkpoints if os.path.normpath(c) not in protected]
    keep_others = max(save_total_limit - len(protected), 0)
    if os.path.normpath(checkpoints[-1]) not in protected:
        keep_others = max(keep_others, 1)
    return others[: max(0, len(others) - keep_others)]


def newest_verified_checkpoint(checkpoints: list[str], *, quick: bool = True) -> str | None:
    """The newest of `checkpoints` (oldest first) whose files match its manifest (or that has none)."""
    for path in reversed(checkpoints):
        try:
            verify_checkpoint(path, quick=quick)
        except (CheckpointIntegrityError, FileNotFoundError) as exc:
            logger.warning("Checkpoint %s does not verify: %s", path, exc)
            continue
        return path
    return None


def rotate_checkpoints(run_dir: str, save_total_limit: int | None, best: str | None) -> list[str]:
    """Deletes old checkpoints beyond save_total_limit; returns what it deleted.

    Never deletes the best checkpoint nor the newest one that verifies. Only that check runs here,
    and it is the quick one (files present with their manifest sizes: catches truncation, no
    hashing), so rotation costs a stat per file; loading does the full sha256 check.
    """
    checkpoints = sorted_checkpoints(run_dir)
    if not save_total_limit or save_total_limit <= 0 or len(checkpoints) <= save_total_limit:
        return []
    good = newest_verified_checkpoint(checkpoints, quick=True)
    doomed = checkpoints_to_delete(checkpoints, save_total_limit, best, protect=(good,))
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


def verify_for_load(directory: str) -> None:
    """Verifies a checkpoint before it is loaded; logs (info) when it has no manifest to check.

    Raises:
        CheckpointIntegrityError: a file is missing, truncated or corrupted (the error names it).
    """
    if verify_checkpoint(directory) is Verdict.NO_MANIFEST:
        logger.info(
            "Checkpoint %s has no %s (written by transformers or an older xtrainer): loading it unverified.",
            directory, MANIFEST_NAME,
        )


def _skip_warning(path: str, why: BaseException) -> None:
    message = f"Skipping checkpoint {path} for resume_from_checkpoint=True: {why}"
    logger.warning(message)
    warnings.warn(message, stacklevel=3)


def resolve_resume_checkpoint(resume_from_checkpoint, output_dir: str) -> str | None:
    """The checkpoint directory that `train(resume_from_checkpoint=...)` means, verified.

    With True: the newest checkpoint-N in output_dir that verifies against its manifest (or has no
    manifest); each newer one that does not is skipped with a warning saying why. With a path:
    that checkpoint, which must verify.

    Raises:
        ValueError / FileNotFoundError: nothing to resume from, with the path that was searched.
        CheckpointIntegrityError: the explicit checkpoint (or every candidate) is damaged.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        checkpoints = sorted_checkpoints(output_dir)
        if not checkpoints:
            raise ValueError(
                f"No valid checkpoint found in output directory ({output_dir}): resume_from_checkpoint=True needs a "
                "checkpoint-N directory there."
            )
        failures = []
        for path in reversed(checkpoints):
            try:
                verify_for_load(path)
            except (CheckpointIntegrityError, FileNotFoundError) as exc:
                _skip_warning(path, exc)
                failures.append(f"{path}: {exc}")
                continue
            return path
        raise CheckpointIntegrityError(
            f"resume_from_checkpoint=True but no checkpoint in output_dir={output_dir!r} verifies:\n"
            + "\n".join(failures),
            checkpoint=output_dir,
        )
    path = os.fspath(resume_from_checkpoint)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Can't find a valid checkpoint at {path}: resume_from_checkpoint={path!r} does not "
                                "exist (or is not a directory).")
    if not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
        raise ValueError(
            f"resume_from_checkpoint={path!r} is not a complete checkpoint: it has no {TRAINER_STATE_NAME}."
        )
    verify_for_load(path)
    return path


__all__ = [
    "CheckpointDiskFullError",
    "CheckpointIntegrityError",
    "CheckpointWriteError",
    "TRAINER_STATE_NAME",
    "TRAINING_ARGS_NAME",
    "atomic_checkpoint",
    "checkpoint_dir_name",
    "checkpoint_step",
    "checkpoints_to_delete",
    "describe_save_failure",
    "discard_temporary",
    "newest_verified_checkpoint",
    "prepare_temporary",
    "publish_temporary",
    "remove_stale_temporaries",
    "resolve_resume_checkpoint",
    "rotate_checkpoints",
    "save_failure_error",
    "save_training_args",
    "temporary_dir",
    "verify_for_load",
    "writing",
]
