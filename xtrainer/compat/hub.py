"""The Hugging Face Hub: push_to_hub, hub_strategy, init_hf_repo and create_model_card, as transformers does them,
through huggingface_hub's own client (so HF_ENDPOINT, HF_TOKEN and its offline switch apply).

- `Trainer(args=TrainingArguments(push_to_hub=True, ...))` creates (or reuses) the repository when the Trainer
  is built, so an unreachable Hub fails before any training.
- `hub_strategy` ("every_save" by default): at each checkpoint the main process copies the model files into
  output_dir and uploads output_dir in the background ("Training in progress, step N"); "checkpoint" also
  uploads the checkpoint as `last-checkpoint/`, "all_checkpoints" each one under its own name; "end" uploads
  only when save_model() / push_to_hub() runs. A checkpoint push is skipped while the previous one is still
  uploading, unless `hub_always_push`. A checkpoint upload that fails is logged as an error and training goes on
  (the files stay in output_dir; the next push uploads them again).
- One huggingface_hub client per Trainer: its single upload thread keeps the background commits in the order
  the checkpoints were saved.
- `trainer.push_to_hub()` saves the model, writes a model card (README.md: hyperparameters and results,
  transformers' TrainingSummary) and uploads output_dir, leaving out checkpoint folders and `_*` files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent import futures
from pathlib import Path

from ..extras import MissingExtraError, require
from ..trainer_utils import HubStrategy, SaveStrategy

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint"
_MODEL_FILES = ("config.json", "generation_config.json", "pytorch_model.bin", "model.safetensors",
                "adapter_config.json", "adapter_model.bin", "adapter_model.safetensors",
                "flax_model.msgpack", "xtrainer_model.json")  # the last two: what the jax backend exports
_INDEX_FILES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")


def hf_api(trainer):
    """The trainer's huggingface_hub client, made on first use. One per Trainer: HfApi runs `run_as_future`
    uploads on one thread of its own, so the checkpoints' commits reach the Hub in the order they were made."""
    api = getattr(trainer, "_hub_api", None)
    if api is None:
        api = trainer._hub_api = require("huggingface_hub", "hub", "push_to_hub").HfApi()
    return api


class PushInProgress:
    """Uploads started in the background for one checkpoint (futures of huggingface_hub's upload_folder)."""

    def __init__(self, jobs: list):
        self.jobs = list(jobs)

    def is_done(self) -> bool:
        return all(job.done() for job in self.jobs)

    def wait_until_done(self) -> None:
        futures.wait(self.jobs)
        self.report_failures()

    def report_failures(self) -> None:
        """Logs each finished upload that failed, once (training goes on: the files stay in output_dir and the
        next push uploads them again)."""
        for job in self.jobs:
            if not job.done() or job.cancelled() or job.exception() is None or getattr(job, "_reported", False):
                continue
            job._reported = True
            logger.error("A push to the Hub failed (%s: %s); the files stay in output_dir and the next push uploads "
                         "them.", type(job.exception()).__name__, job.exception())


def init_hf_repo(trainer, token: str | None = None, private: bool | None = None) -> None:
    """Creates the repository (or reuses it) and sets trainer.hub_model_id (main process)."""
    if not trainer.is_world_process_zero():
        return
    args = trainer.args
    name = args.hub_model_id if args.hub_model_id is not None else Path(args.output_dir).absolute().name
    token = token if token is not None else args.hub_token
    private = private if private is not None else args.hub_private_repo
    try:
        url = hf_api(trainer).create_repo(name, token=token, private=private, exist_ok=True)
    except MissingExtraError:
        raise
    except Exception as exc:  # offline mode, no network, bad token: say so before any training
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise RuntimeError(
            f"push_to_hub: cannot create or reach the Hub repository {name!r} at {endpoint}: {exc}. Check the network "
            "and HF_ENDPOINT / HF_TOKEN (HF_HUB_OFFLINE must be unset), or set push_to_hub=False."
        ) from exc
    trainer.hub_model_id = url.repo_id
    trainer.push_in_progress = None


def _model_files(checkpoint: str) -> list[str]:
    names = list(_MODEL_FILES)
    for index in _INDEX_FILES:
        path = os.path.join(checkpoint, index)
        if os.path.isfile(path):
            names.append(index)
            with open(path, encoding="utf-8") as f:
                names.extend(sorted(set(json.load(f)["weight_map"].values())))
    return names


def push_from_checkpoint(trainer, checkpoint: str) -> None:
    """After a checkpoint is published (main process): upload output_dir's model files, and the checkpoint itself
    with hub_strategy "checkpoint" / "all_checkpoints", in the background."""
    args = trainer.args
    strategy = HubStrategy(args.hub_strategy)
    if not trainer.is_world_process_zero() or strategy == HubStrategy.END:
        return
    pushing = getattr(trainer, "push_in_progress", None)
    if pushing is not None:
        pushing.report_failures()
    if not args.hub_always_push and pushing is not None and not pushing.is_done():
        return  # the previous push is still uploading
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    output_dir = args.output_dir
    for name in _model_files(checkpoint):
        if os.path.isfile(os.path.join(checkpoint, name)):
            shutil.copy(os.path.join(checkpoint, name), os.path.join(output_dir, name))
    if trainer.processing_class is not None and hasattr(trainer.processing_class, "save_pretrained"):
        trainer.processing_class.save_pretrained(output_dir)
    from ..checkpoint import save_training_args

    save_training_args(args, output_dir)
    if args.save_strategy == SaveStrategy.STEPS:
        message = f"Training in progress, step {trainer.state.global_step}"
    else:
        message = f"Training in progress, epoch {int(trainer.state.epoch or 0)}"
    api = hf_api(trainer)
    jobs = [api.upload_folder(repo_id=trainer.hub_model_id, folder_path=output_dir, commit_message=message,
                              token=args.hub_token, run_as_future=True, revision=args.hub_revision,
                              ignore_patterns=["_*", f"{CHECKPOINT_PREFIX}-*", f"tmp-{CHECKPOINT_PREFIX}-*"])]
    if strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
        in_repo = "last-checkpoint" if strategy == HubStrategy.CHECKPOINT else Path(checkpoint).name
        jobs.append(api.upload_folder(repo_id=trainer.hub_model_id, folder_path=checkpoint, path_in_repo=in_repo,
                                      commit_message=message + ", checkpoint", token=args.hub_token,
                                      run_as_future=True, revision=args.hub_revision))
    if pushing is None or pushing.is_done():
        trainer.push_in_progress = PushInProgress(jobs)
    else:
        pushing.jobs.extend(jobs)


def finish_current_push(trainer) -> None:
    """Waits for the checkpoint uploads in flight."""
    pushing = getattr(trainer, "push_in_progress", None)
    if pushing is not None and not pushing.is_done():
        logger.info("Waiting for the current checkpoint push to finish.")
    if pushing is not None:
        pushing.wait_until_done()  # and logs the uploads that failed


def create_model_card(trainer, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                      tasks=None, dataset_tags=None, dataset=None, dataset_args=None) -> None:
    """Writes output_dir/README.md: transformers' model card with the run's hyperparameters and results."""
    if not trainer.is_world_process_zero():
        return
    ModelCard = require("huggingface_hub", "hub", "create_model_card").ModelCard
    TrainingSummary = require("transformers.modelcard", "hub", "create_model_card").TrainingSummary
    path = os.path.join(trainer.args.output_dir, "README.md")
    if os.path.exists(path):
        existing = ModelCard.load(path).data.tags
        if tags is not None and existing is not None:
            tags = [tags] if isinstance(tags, str) else list(tags)
            tags += [tag for tag in existing if tag not in tags]
    summary = TrainingSummary.from_trainer(
        _CardView(trainer), language=language, license=license, tags=tags, model_name=model_name,
        finetuned_from=finetuned_from, tasks=tasks, dataset_tags=dataset_tags, dataset=dataset,
        dataset_args=dataset_args,
    )
    os.makedirs(trainer.args.output_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(summary.to_model_card())


class _CardView:
    """What transformers' TrainingSummary reads of a trainer; a model without a `config` (Flax) gets an empty one."""

    def __init__(self, trainer):
        import types

        self.args, self.state = trainer.args, trainer.state
        self.train_dataset, self.eval_dataset = trainer.train_dataset, trainer.eval_dataset
        self.accelerator = getattr(trainer, "accelerator", None)
        model = trainer.model
        if not hasattr(model, "config"):
            # Same class name (the card's task is inferred from it), no transformers config to read.
            model = type(type(model).__name__, (), {})()
            model.config = types.SimpleNamespace()
        self.model = model


def push_to_hub(trainer, commit_message: str | None = "End of training", blocking: bool = True,
                token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
    """Saves the model, writes the model card and uploads output_dir (checkpoints left out)."""
    args = trainer.args
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    model_name = kwargs.pop("model_name", None)
    if model_name is None and args.should_save:
        model_name = Path(args.output_dir).name if args.hub_model_id is None else args.hub_model_id.split("/")[-1]
    token = token if token is not None else args.hub_token
    if trainer.hub_model_id is None:
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
    finish_current_push(trainer)
    return hf_api(trainer).upload_folder(
        repo_id=trainer.hub_model_id, folder_path=args.output_dir, commit_message=commit_message, token=token,
        run_as_future=not blocking, revision=revision if revision is not None else args.hub_revision,
        ignore_patterns=["_*", f"{CHECKPOINT_PREFIX}-*", f"tmp-{CHECKPOINT_PREFIX}-*"],
    )
