"""Checkpoint manifests: every file of a checkpoint with its size and sha256, verified on load.

`write_manifest` runs as the last step of a save, inside the temporary directory, right before
the publishing rename (checkpoint.atomic_checkpoint), so the manifest describes exactly the files
that were published. `verify_checkpoint` re-reads them and raises `CheckpointIntegrityError`
naming the first bad file: missing, truncated (size differs) or corrupted (checksum differs).

Checkpoints without a manifest (written by transformers' Trainer, or by an older xtrainer) are
still loadable; `verify_checkpoint` reports them as unverified instead of failing.

Hashing streams each file in 4 MiB chunks on a small thread pool: hashlib releases the GIL on
large updates, so several files hash in parallel and a large file never sits in memory whole.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)

MANIFEST_NAME = "xtrainer_manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 4 << 20
_MAX_WORKERS = 8


class CheckpointIntegrityError(ValueError):
    """A checkpoint's files do not match its manifest (missing, truncated or corrupted file).

    A ValueError, like the backends' "Cannot read ... (truncated or corrupt?)" errors, so code that
    handles an unreadable checkpoint handles this one too. `path` is the bad file (or the manifest
    itself) and `checkpoint` the checkpoint directory.
    """

    def __init__(self, message: str, *, checkpoint: str, path: str | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.path = path

    def __str__(self) -> str:
        return self.args[0]


class Verdict(enum.Enum):
    """What verify_checkpoint found."""

    VERIFIED = "verified"
    NO_MANIFEST = "no manifest"


def _fix_hint(checkpoint: str) -> str:
    return (
        f"The checkpoint {checkpoint} is damaged: delete it and resume from an earlier one "
        "(resume_from_checkpoint=True picks the newest checkpoint that verifies)."
    )


def sha256_file(path: str) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _list_files(root: str) -> list[str]:
    """Relative paths (with '/') of every regular file under root except the manifest, sorted."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if rel != MANIFEST_NAME:
                files.append(rel)
    return sorted(files)


def _hash_many(root: str, rel_paths: list[str]) -> list[str]:
    paths = [os.path.join(root, *rel.split("/")) for rel in rel_paths]
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(_MAX_WORKERS, len(paths))) as pool:
        return list(pool.map(sha256_file, paths))


def write_manifest(directory: str) -> str:
    """Writes `xtrainer_manifest.json` listing every file under directory (size, sha256); returns its path.

    Call it once all other files of the checkpoint are written (the manifest does not list itself).
    The manifest is written to a temporary name and renamed, so it is never seen half-written.
    """
    files = _list_files(directory)
    digests = _hash_many(directory, files)
    entries = {
        rel: {"size": os.path.getsize(os.path.join(directory, *rel.split("/"))), "sha256": digest}
        for rel, digest in zip(files, digests)
    }
    path = os.path.join(directory, MANIFEST_NAME)
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump({"version": MANIFEST_VERSION, "algorithm": "sha256", "files": entries}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(directory: str) -> dict | None:
    """The manifest's file table ({relative path: {size, sha256}}), or None when the checkpoint has none.

    Raises:
        CheckpointIntegrityError: the manifest itself is unreadable.
    """
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointIntegrityError(
            f"The manifest {path} is unreadable ({exc}). {_fix_hint(directory)}", checkpoint=directory, path=path
        ) from exc
    return files


def verify_checkpoint(directory: str, *, quick: bool = False) -> Verdict:
    """Checks every file listed in the checkpoint's manifest: present, same size, same sha256.

    Args:
        directory: a checkpoint-N directory.
        quick: compare presence and sizes only (no hashing): catches truncation and missing files
            at the cost of a stat per file. Rotation uses it; loading always does the full check.

    Returns:
        Verdict.VERIFIED, or Verdict.NO_MANIFEST for a checkpoint written without one (transformers).

    Raises:
        CheckpointIntegrityError: naming the first bad file and how it is bad.
        FileNotFoundError: `directory` does not exist.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Checkpoint directory {directory} does not exist.")
    files = read_manifest(directory)
    if files is None:
        return Verdict.NO_MANIFEST
    files = _without_rewritten_weights(directory, files)
    for rel, entry in sorted(files.items()):
        path = os.path.join(directory, *rel.split("/"))
        if not os.path.isfile(path):
            raise CheckpointIntegrityError(
                f"Checkpoint file {path} is missing (listed in {MANIFEST_NAME}). {_fix_hint(directory)}",
                checkpoint=directory, path=path,
            )
        size = os.path.getsize(path)
        if size != entry["size"]:
            raise CheckpointIntegrityError(
                f"Checkpoint file {path} is truncated or altered: {size} bytes on disk, {entry['size']} in "
                f"{MANIFEST_NAME}. {_fix_hint(directory)}",
                checkpoint=directory, path=path,
            )
    if quick:
        return Verdict.VERIFIED
    names = sorted(files)
    for rel, digest in zip(names, _hash_many(directory, names)):
        if digest != files[rel]["sha256"]:
            path = os.path.join(directory, *rel.split("/"))
            raise CheckpointIntegrityError(
                f"Checkpoint file {path} is corrupted: its sha256 differs from the one in {MANIFEST_NAME}. "
                f"{_fix_hint(directory)}",
                checkpoint=directory, path=path,
            )
    return Verdict.VERIFIED


_WEIGHT_SETS = (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def _is_weight_file(rel: str) -> bool:
    return "/" not in rel and rel.startswith(("model", "pytorch_model")) and rel.endswith((".safetensors", ".bin", ".index.json"))


def _complete_weight_set(directory: str) -> bool:
    """The directory holds a whole set of model weights: a single file, or an index whose shards all exist."""
    for single, index in _WEIGHT_SETS:
        if os.path.isfile(os.path.join(directory, single)):
            return True
        index_path = os.path.join(directory, index)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    shards = set(json.load(f)["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                return False
            return bool(shards) and all(os.path.isfile(os.path.join(directory, s)) for s in shards)
    return False


def _without_rewritten_weights(directory: str, files: dict) -> dict:
    """The manifest's table minus its model-weight files when the user re-saved the weights in another layout.

    Re-sharding a checkpoint's weights (one model.safetensors rewritten as an index and shards, as
    save_pretrained(max_shard_size=...) does) removes files the manifest lists. When a complete set
    of weights is there instead, the rest of the checkpoint is still verified and the weights are
    loaded as they are now, with a warning; safetensors still refuses a truncated file on load. A
    weight file that is present but differs is corruption and stays an error.
    """
    listed = [rel for rel in files if _is_weight_file(rel)]
    missing = [rel for rel in listed if not os.path.isfile(os.path.join(directory, rel))]
    if not missing or not _complete_weight_set(directory):
        return files
    logger.warning(
        "The model weights in %s were rewritten after the checkpoint was saved (%s no longer there); the manifest "
        "cannot vouch for them, so they are loaded as they are. Every other file of the checkpoint is verified.",
        directory, ", ".join(missing[:3]),
    )
    return {rel: entry for rel, entry in files.items() if rel not in listed}


__all__ = [
    "MANIFEST_NAME",
    "CheckpointIntegrityError",
    "Verdict",
    "read_manifest",
    "sha256_file",
    "verify_checkpoint",
    "write_manifest",
]
