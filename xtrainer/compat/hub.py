"""Pushing to the Hugging Face Hub as transformers' Trainer does, through huggingface_hub's own client.

- `init_hf_repo`: creates (or finds) the repository `hub_model_id` (default: the name of output_dir)
  and records its id in `trainer.hub_model_id`. With `push_to_hub=True` the Trainer calls it while it is
  built, so a Hub that cannot be reached, or a token that cannot write, fails before any training
  (`HubUnreachableError`, naming the endpoint and the cause).
- At every checkpoint (unless `hub_strategy="end"`): the model files of the checkpoint are copied into
  output_dir with the processing class and training_args.bin, and output_dir is uploaded in the
  background as "Training in progress, step N" (or "epoch N"); with `hub_strategy="checkpoint"` the
  checkpoint folder also goes to `last-checkpoint/`, with `"all_checkpoints"` to `checkpoint-N/`. A push
  still running makes the next checkpoint skip its push, unless `hub_always_push=True`. Training waits
  for the last push before train() returns; an upload that failed is logged as an error (the files stay
  in output_dir, and the next push uploads them again).
- `push_to_hub` (and `save_model()` called by the user with push_to_hub=True, as "Model save"): saves
  the model, writes the model card (README.md), and uploads output_dir in one commit.

Uploads go to `hub_revision` (default: the repository's main branch) with `hub_token` (default: the
token huggingface_hub finds: HF_TOKEN, or a saved login), to HF_ENDPOINT when it is set. Checkpoint
folders, temporary checkpoint folders and names starting with "_" are never uploaded from output_dir.

JAX checkpoints hold the model inside the orbax state, not as model files; there the model is exported
into output_dir (the Trainer's `_save`, process 0) in the step loop before the checkpoint's push.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent import futures
from pathlib import Path
from typing import Any, Callable

from .. import checkpoint as ckpt
from ..extras import MissingExtraError, require
from ..trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, SaveStrategy

logger = logging.getLogger(__name__)

#: never uploaded from output_dir: private names, checkpoints (pushed on their own by the strategy),
#: checkpoints still being written.
IGNORE_PATTERNS = ["_*", f"{PREFIX_CHECKPOINT_DIR}-*", f"tmp-{PREFIX_CHECKPOINT_DIR}-*"]
#: the files of a checkpoint that make the model loadable from the repository's root.
MODEL_FILES = ("config.json", "generation_config.json", "pytorch_model.bin", "model.safetensors",
               "adapter_config.json", "adapter_model.bin", "adapter_model.safetensors")
INDEX_FILES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")


class HubUnreachableError(RuntimeError):
    """push_to_hub=True, but the Hub repository could not be created or reached."""


class PushInProgress:
    """The uploads of one push (futures of huggingface_hub's upload_folder)."""

    def __init__(self, jobs: list[futures.Future] | None = None):
        self.jobs = list(jobs or [])

    def is_done(self) -> bool:
        return all(job.done() for job in self.jobs)

    def wait_until_done(self) -> None:
        futures.wait(self.jobs)

    def report_failures(self) -> None:
        """Logs, once, each finished upload that failed (training goes on: the files stay in output_dir, and
        the next push or push_to_hub() uploads them again)."""
        for job in self.jobs:
            if not job.done() or job.cancelled() or job.exception() is None or getattr(job, "_reported", False):
                continue
            job._reported = True
            logger.error("A push to the Hub failed (%s: %s); the files stay in output_dir and the next push "
                         "uploads them.", type(job.exception()).__name__, job.exception())

    def cancel(self) -> None:
        self.jobs = [job for job in self.jobs if not (job.cancel() or job.done())]


def _strategy(args) -> HubStrategy:
    return HubStrategy(getattr(args.hub_strategy, "value", args.hub_strategy))


def hub_api(trainer: Any):
    """The trainer's huggingface_hub client (one per Trainer: its single upload thread keeps the background
    commits in order), on HF_ENDPOINT when set (read when the client is made, not at import)."""
    api = getattr(trainer, "_hub_api", None)
    if api is None:
        huggingface_hub = require("huggingface_hub", "hub", "push_to_hub")
        from .. import __version__

        api = huggingface_hub.HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, library_name="xtrainer",
                                    library_version=__version__)
        trainer._hub_api = api
    return api


def init_hf_repo(trainer: Any, token: str | None = None, private: bool | None = None) -> None:
    """Creates the repository (exist_ok) on process zero and records `trainer.hub_model_id`."""
    if not trainer.is_world_process_zero():
        return
    args = trainer.args
    repo_name = args.hub_model_id if args.hub_model_id is not None else Path(args.output_dir).absolute().name
    token = token if token is not None else args.hub_token
    private = private if private is not None else args.hub_private_repo
    repo_url = hub_api(trainer).create_repo(repo_name, token=token, private=private, exist_ok=True)
    trainer.hub_model_id = repo_url.repo_id
    trainer.push_in_progress = None


def init_hf_repo_or_fail(trainer: Any) -> None:
    """`init_hf_repo` at Trainer construction: any failure becomes one HubUnreachableError saying what to do."""
    try:
        trainer.init_hf_repo()
    except MissingExtraError:
        raise
    except Exception as exc:  # noqa: BLE001 - network, auth, offline mode: all mean "cannot push"
        args = trainer.args
        endpoint = os.environ.get("HF_ENDPOINT") or _default_endpoint()
        repo = args.hub_model_id or Path(args.output_dir).absolute().name
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubUnreachableError(
            f"push_to_hub=True, but the Hub repository {repo!r} could not be created at {endpoint} "
            f"({type(exc).__name__}: {cause}). Check the network, HF_ENDPOINT, HF_HUB_OFFLINE and hub_token "
            "(or HF_TOKEN / `hf auth login`), or set push_to_hub=False to train without pushing."
        ) from exc


def _default_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except ImportError:
        return "https://huggingface.co"


def finish_current_push(trainer: Any) -> None:
    """Waits for the push in progress, if any (transformers' _finish_current_push)."""
    push = getattr(trainer, "push_in_progress", None)
    if push is None:
        return
    if not push.is_done():
        logger.info("Waiting for the current checkpoint push to be finished, this might take a couple of minutes.")
        push.wait_until_done()
    push.report_failures()


def _model_files_of(checkpoint_folder: str) -> list[str]:
    names = list(MODEL_FILES)
    for index_name in INDEX_FILES:
        index_path = os.path.join(checkpoint_folder, index_name)
        if os.path.isfile(index_path):
            names.append(index_name)
            with open(index_path, encoding="utf-8") as f:
                names.extend(sorted(set(json.load(f)["weight_map"].values())))
    return [name for name in names if os.path.isfile(os.path.join(checkpoint_folder, name))]


def prepare_checkpoint_push(trainer: Any) -> Callable[[str], None] | None:
    """At a checkpoint save, in the step loop: what to push once the checkpoint is published.

    Returns None when this save pushes nothing (not process zero, push_to_hub off, hub_strategy "end",
    or a push still running without hub_always_push); else a function of the published checkpoint folder
    that uploads (in the background) and returns. Backends whose checkpoints hold no model files (JAX) get
    the model exported into output_dir here, while the step loop waits, as a save_model would.
    """
    args = trainer.args
    if not args.push_to_hub or not trainer.is_world_process_zero() or _strategy(args) == HubStrategy.END:
        return None
    push = getattr(trainer, "push_in_progress", None)
    if not args.hub_always_push and push is not None and not push.is_done():
        return None
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    if trainer.backend.weights_restored_with_state and not trainer.hooks.overrides("_save"):
        trainer._save(args.output_dir)
    step_based = getattr(args.save_strategy, "value", args.save_strategy) == SaveStrategy.STEPS.value
    message = (f"Training in progress, step {trainer.state.global_step}" if step_based
               else f"Training in progress, epoch {int(trainer.state.epoch or 0)}")

    def push_checkpoint(checkpoint_folder: str) -> None:
        output_dir = args.output_dir
        for name in _model_files_of(checkpoint_folder):
            shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(output_dir, name))
        # Fast to rewrite, and they may have changed since the last save.
        if trainer.processing_class is not None and hasattr(trainer.processing_class, "save_pretrained"):
            trainer.processing_class.save_pretrained(output_dir)
        ckpt.save_training_args(args, output_dir)
        api = hub_api(trainer)
        jobs = [api.upload_folder(repo_id=trainer.hub_model_id, folder_path=output_dir, commit_message=message,
                                  token=args.hub_token, run_as_future=True, ignore_patterns=IGNORE_PATTERNS,
                                  revision=args.hub_revision)]
        strategy = _strategy(args)
        if strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            path_in_repo = "last-checkpoint" if strategy == HubStrategy.CHECKPOINT else Path(checkpoint_folder).name
            jobs.append(api.upload_folder(repo_id=trainer.hub_model_id, folder_path=checkpoint_folder,
                                          path_in_repo=path_in_repo, commit_message=f"{message}, checkpoint",
                                          token=args.hub_token, run_as_future=True, revision=args.hub_revision))
        current = getattr(trainer, "push_in_progress", None)
        if current is None or current.is_done():
            if current is not None:
                current.report_failures()
            trainer.push_in_progress = PushInProgress(jobs)
        else:
            current.jobs.extend(jobs)

    return push_checkpoint


def push_to_hub(trainer: Any, commit_message: str | None = "End of training", blocking: bool = True,
                token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
    """transformers' Trainer.push_to_hub: save the model, write the model card, upload output_dir.

    Returns huggingface_hub's CommitInfo (a Future of it with blocking=False); None on other processes.
    """
    args = trainer.args
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    model_name = kwargs.pop("model_name", None)
    if model_name is None and args.should_save:
        model_name = Path(args.output_dir).name if args.hub_model_id is None else args.hub_model_id.split("/")[-1]
    token = token if token is not None else args.hub_token
    if getattr(trainer, "hub_model_id", None) is None:
        trainer.init_hf_repo(token=token, private=private)
    trainer.save_model(_internal_call=True)  # every process: gathering sharded weights is collective
    if not trainer.is_world_process_zero():
        return None
    model_tags = getattr(trainer.model, "model_tags", None)
    if model_tags is not None:
        tags = kwargs.get("tags") or []
        tags = [tags] if isinstance(tags, str) else list(tags)
        kwargs["tags"] = tags + [tag for tag in model_tags if tag not in tags]
    trainer.create_model_card(model_name=model_name, **kwargs)
    revision = revision if revision is not None else args.hub_revision
    finish_current_push(trainer)
    return hub_api(trainer).upload_folder(repo_id=trainer.hub_model_id, folder_path=args.output_dir,
                                   commit_message=commit_message, token=token, run_as_future=not blocking,
                                   ignore_patterns=IGNORE_PATTERNS, revision=revision)


__all__ = ["HubUnreachableError", "IGNORE_PATTERNS", "PushInProgress", "finish_current_push", "hub_api",
           "init_hf_repo", "init_hf_repo_or_fail", "prepare_checkpoint_push", "push_to_hub"]
