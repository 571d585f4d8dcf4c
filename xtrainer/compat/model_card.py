"""`Trainer.create_model_card`: the README.md draft transformers' Trainer writes into output_dir.

The card has transformers' layout: YAML metadata (library_name, license, base_model, tags with
`generated_from_trainer`, datasets, metrics, a `model-index` with the final evaluation results), then
the description, the results on the evaluation set, the training hyperparameters, a table of the
evaluations made during training and the framework versions (xtrainer and its backend added).

Everything comes from the Trainer: arguments, `state.log_history`, the model's class and config, and
the datasets' names when they are `datasets.Dataset`s. Nothing is fetched from the network.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .parameters import _is_torch_module

GENERATED_TAG = "generated_from_trainer"
_DRAFT_NOTE = (
    "\n<!-- This model card has been generated automatically according to the information the Trainer had access "
    "to. You\nshould probably proofread and complete it, then remove this comment. -->\n"
)
# Task tag -> its name on the Hub, and the model-class suffixes that imply it.
_TASK_NAMES = {
    "fill-mask": "Masked Language Modeling",
    "image-classification": "Image Classification",
    "multiple-choice": "Multiple Choice",
    "question-answering": "Question Answering",
    "text-classification": "Text Classification",
    "text-generation": "Causal Language Modeling",
    "text2text-generation": "Sequence-to-sequence Language Modeling",
    "token-classification": "Token Classification",
    "automatic-speech-recognition": "Automatic Speech Recognition",
    "audio-classification": "Audio Classification",
}
_TASK_BY_CLASS_SUFFIX = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForMaskedLM", "fill-mask"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMultipleChoice", "multiple-choice"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForSeq2SeqLM", "text2text-generation"),
    ("ForImageClassification", "image-classification"),
    ("ForCTC", "automatic-speech-recognition"),
    ("ForAudioClassification", "audio-classification"),
)
# Metric names the Hub knows as metric tags.
_METRIC_TAGS = ("accuracy", "bleu", "f1", "matthews_correlation", "pearsonr", "precision", "recall", "rouge",
                "sacrebleu", "spearmanr", "wer")
# Dataset builders that are file formats, not datasets on the Hub.
_LOCAL_BUILDERS = ("csv", "json", "pandas", "parquet", "text", "arrow", "generator")
_SPEED_KEYS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "step")


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _round(value, decimals: int = 4) -> str:
    if isinstance(value, float):
        text = str(value)
        if "." in text and len(text.split(".")[1]) > decimals:
            return f"{value:.{decimals}f}"
    return str(value)


def _title(key: str) -> str:
    return " ".join(part.capitalize() for part in key.split("_"))


@dataclass
class TrainingSummary:
    """What the card says; `to_markdown` writes it."""

    model_name: str
    language: list[str] = field(default_factory=list)
    license: str | None = None
    tags: list[str] = field(default_factory=list)
    finetuned_from: str | None = None
    tasks: list[str] = field(default_factory=list)
    dataset: list[str] = field(default_factory=list)
    dataset_tags: list[str] = field(default_factory=list)
    dataset_args: list[str | None] = field(default_factory=list)
    dataset_metadata: list[dict] = field(default_factory=list)
    eval_results: dict[str, Any] | None = None
    eval_lines: list[dict[str, Any]] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    framework_versions: dict[str, str] = field(default_factory=dict)

    def metric_tags(self) -> dict[str, str]:
        """Hub metric tag -> the eval result that carries it."""
        found = {}
        for name in self.eval_results or {}:
            key = name.lower().replace(" ", "_")
            if key in _METRIC_TAGS:
                found[key] = name
            elif key == "rouge1":
                found["rouge"] = name
        return found

    def model_index(self) -> list[dict]:
        entry: dict[str, Any] = {"name": self.model_name, "results": []}
        tasks = {t: _TASK_NAMES[t] for t in self.tasks if t in _TASK_NAMES}
        datasets = dict(zip(self.dataset_tags, self.dataset or self.dataset_tags))
        if not tasks and not datasets:
            return [entry]
        args = dict(zip(self.dataset_tags, self.dataset_args + [None] * len(self.dataset_tags)))
        metadata = dict(zip(self.dataset_tags, self.dataset_metadata))
        metrics = self.metric_tags()
        for task in tasks or {None: None}:
            for tag in datasets or {None: None}:
                result: dict[str, Any] = {}
                if task is not None:
                    result["task"] = {"name": tasks[task], "type": task}
                if tag is not None:
                    result["dataset"] = {"name": datasets[tag], "type": tag, **metadata.get(tag, {})}
                    if args.get(tag) is not None:
                        result["dataset"]["args"] = args[tag]
                if metrics:
                    result["metrics"] = [{"name": name, "type": metric_tag, "value": self.eval_results[name]}
                                         for metric_tag, name in metrics.items()]
                if {"task", "dataset", "metrics"} <= set(result):  # the Hub rejects partial results
                    entry["results"].append(result)
        return [entry]

    def metadata(self) -> dict[str, Any]:
        data: dict[str, Any] = {"library_name": "transformers"}
        if self.language:
            data["language"] = self.language
        if self.license:
            data["license"] = self.license
        if self.finetuned_from:
            data["base_model"] = self.finetuned_from
        if self.tags:
            data["tags"] = self.tags
        if self.dataset_tags:
            data["datasets"] = self.dataset_tags
        if self.metric_tags():
            data["metrics"] = list(self.metric_tags())
        data["model-index"] = self.model_index()
        return data

    def to_markdown(self) -> str:
        card = f"---\n{yaml.dump(self.metadata(), sort_keys=False)}---\n" + _DRAFT_NOTE
        card += f"\n# {self.model_name}\n\n"
        if self.finetuned_from:
            card += (f"This model is a fine-tuned version of [{self.finetuned_from}]"
                     f"(https://huggingface.co/{self.finetuned_from}) on ")
        else:
            card += "This model was trained from scratch on "
        if not self.dataset:
            card += "an unknown dataset."
        elif len(self.dataset) == 1:
            card += f"the {self.dataset[0]} dataset."
        else:
            card += ", ".join(f"the {d}" for d in self.dataset[:-1]) + f" and the {self.dataset[-1]} datasets."
        if self.eval_results is not None:
            card += "\nIt achieves the following results on the evaluation set:\n"
            card += "\n".join(f"- {name}: {_round(value)}" for name, value in self.eval_results.items())
        card += "\n"
        for section in ("Model description", "Intended uses & limitations", "Training and evaluation data"):
            card += f"\n## {section}\n\nMore information needed\n"
        card += "\n## Training procedure\n\n### Training hyperparameters\n"
        if self.hyperparameters:
            card += "\nThe following hyperparameters were used during training:\n"
            card += "\n".join(f"- {name}: {value}" for name, value in self.hyperparameters.items()) + "\n"
        else:
            card += "\nMore information needed\n"
        if self.eval_lines is not None:
            card += "\n### Training results\n\n" + markdown_table(self.eval_lines) + "\n"
        card += "\n### Framework versions\n\n"
        card += "".join(f"- {name} {version}\n" for name, version in self.framework_versions.items())
        return card


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of `rows` (dicts with the first row's keys), columns padded to their widest cell."""
    if not rows:
        return ""
    widths = {key: len(str(key)) for key in rows[0]}
    for row in rows:
        for key, value in row.items():
            widths[key] = max(widths.get(key, 0), len(_round(value)))

    def line(cells: list[str]) -> str:
        padded = (f"| {cell}" + " " * (width - len(cell) + 1) for cell, width in zip(cells, widths.values()))
        return "".join(padded) + "|\n"

    table = line([str(k) for k in rows[0]])
    table += "".join(f"|:{'-' * width}:" for width in widths.values()) + "|\n"
    for row in rows:
        table += line([_round(row.get(key, "")) for key in widths])
    return table


def parse_log_history(log_history: list[dict]) -> tuple[dict | None, list[dict] | None, dict | None]:
    """(the final train metrics, one row per evaluation during training, the last evaluation's results).

    Rows carry the training loss last logged before each evaluation ("No log" before the first), the
    epoch, the step, the validation loss and every other eval metric (speed figures left out).
    """
    end = next((i for i, log in enumerate(log_history) if "train_runtime" in log), None)
    if end is None:  # evaluation only: report the last one
        last = next((log for log in reversed(log_history) if "eval_loss" in log), None)
        return None, None, last
    lines = []
    training_loss: Any = "No log"
    for log in log_history[:end]:
        if "loss" in log:
            training_loss = log["loss"]
        if "eval_loss" in log:
            values: dict[str, Any] = {"Training Loss": training_loss, "Epoch": log.get("epoch"),
                                      "Step": log.get("step")}
            for key, value in log.items():
                if key in ("total_flos", "epoch", "step") or key.startswith("eval_") and key[5:] in _SPEED_KEYS:
                    continue
                name = "Validation Loss" if key == "eval_loss" else _title(key.split("_", 1)[1] if "_" in key else key)
                values[name] = value
            lines.append(values)
    last_index = max((i for i, log in enumerate(log_history) if "eval_loss" in log), default=None)
    results = None
    if last_index:  # as transformers: an evaluation logged first of all is not a result of training
        results = {_title(key.removeprefix("eval_")): value for key, value in log_history[last_index].items()
                   if key.removeprefix("eval_") not in _SPEED_KEYS}
    return log_history[end], lines, results


def training_hyperparameters(trainer: Any) -> dict[str, Any]:
    """The "Training hyperparameters" list: transformers' entries, with xtrainer's batch arithmetic."""
    args = trainer.args
    backend = trainer.backend
    batch_devices = backend.local_batch_devices * backend.num_processes
    params: dict[str, Any] = {"learning_rate": args.learning_rate, "train_batch_size": args.per_device_train_batch_size,
                              "eval_batch_size": args.per_device_eval_batch_size, "seed": args.seed}
    if batch_devices > 1:
        params["distributed_type"] = (f"{backend.name} ({batch_devices} batch devices over "
                                      f"{backend.num_processes} process(es))")
        params["num_devices"] = batch_devices
    if args.gradient_accumulation_steps > 1:
        params["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    total_train = args.per_device_train_batch_size * batch_devices * args.gradient_accumulation_steps
    if total_train != params["train_batch_size"]:
        params["total_train_batch_size"] = total_train
    total_eval = args.per_device_eval_batch_size * batch_devices
    if total_eval != params["eval_batch_size"]:
        params["total_eval_batch_size"] = total_eval
    optim = getattr(args.optim, "value", args.optim)
    if optim:
        extra = args.optim_args or "No additional optimizer arguments"
        if "adam" in str(optim).lower():
            params["optimizer"] = (f"Use {optim} with betas=({args.adam_beta1},{args.adam_beta2}) and "
                                   f"epsilon={args.adam_epsilon} and optimizer_args={extra}")
        else:
            params["optimizer"] = f"Use {optim} and the args are:\n{extra}"
    params["lr_scheduler_type"] = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if args.warmup_steps:
        params["lr_scheduler_warmup_steps"] = args.warmup_steps
    if args.max_steps != -1:
        params["training_steps"] = args.max_steps
    else:
        params["num_epochs"] = args.num_train_epochs
    if args.fp16:
        params["mixed_precision_training"] = "Native AMP" if backend.name == "torch" else "fp16"
    elif args.bf16:
        params["mixed_precision_training"] = "bf16"
    if args.label_smoothing_factor:
        params["label_smoothing_factor"] = args.label_smoothing_factor
    return params


# Libraries named under "Framework versions", for every run and for each backend's.
_CARD_LIBRARIES = (("Transformers", "transformers"), ("Datasets", "datasets"), ("Tokenizers", "tokenizers"))
_BACKEND_LIBRARIES = {
    "torch": (("Pytorch", "torch"),),
    "jax": (("JAX", "jax"), ("Flax", "flax"), ("Optax", "optax"), ("Pytorch", "torch"), ("torchax", "torchax")),
    "torch_xla": (("Pytorch", "torch"), ("torch_xla", "torch_xla")),
}


def framework_versions(backend_name: str, torch_model: bool) -> dict[str, str]:
    """xtrainer (and its backend), transformers, the backend's libraries and the data libraries, as installed."""
    from .. import __version__

    versions = {"xtrainer": f"{__version__} (backend: {backend_name})"}
    for label, dist in _BACKEND_LIBRARIES.get(backend_name, ()) + _CARD_LIBRARIES:
        if dist in ("torch", "torchax") and backend_name == "jax" and not torch_model:
            continue  # a Flax model on jax: torch played no part
        try:
            versions[label] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _dataset_defaults(dataset: Any) -> tuple[list[str], list[str | None], list[dict]]:
    """(tags, args, metadata) from a datasets.Dataset loaded from the Hub; nothing for other data."""
    builder = getattr(getattr(dataset, "info", None), "builder_name", None) or getattr(dataset, "builder_name", None)
    if not builder or builder in _LOCAL_BUILDERS or not hasattr(dataset, "config_name"):
        return [], [], []
    return [builder], [dataset.config_name], [{"config": dataset.config_name, "split": str(dataset.split)}]


def summary_from_trainer(trainer: Any, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                         tasks=None, dataset_tags=None, dataset=None, dataset_args=None) -> TrainingSummary:
    """The card's content for `trainer` (transformers' TrainingSummary.from_trainer rules)."""
    one_dataset = trainer.eval_dataset if trainer.eval_dataset is not None else trainer.train_dataset
    default_tags, default_args, metadata = _dataset_defaults(one_dataset)
    dataset_tags = _as_list(dataset_tags) or default_tags
    dataset_args = _as_list(dataset_args) or default_args
    dataset = _as_list(dataset) or list(dataset_tags)
    config = getattr(trainer.model, "config", None)
    name_or_path = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if finetuned_from is None and isinstance(name_or_path, str) and name_or_path and not os.path.isdir(name_or_path):
        finetuned_from = name_or_path
    if tasks is None:
        class_name = type(trainer.model).__name__
        tasks = next((task for suffix, task in _TASK_BY_CLASS_SUFFIX if class_name.endswith(suffix)), None)
    model_name = model_name if model_name is not None else Path(trainer.args.output_dir).name
    if not model_name:
        model_name = finetuned_from or "model"
    tags = _as_list(tags)
    if GENERATED_TAG not in tags:
        tags.append(GENERATED_TAG)
    _, eval_lines, eval_results = parse_log_history(trainer.state.log_history)
    return TrainingSummary(
        model_name=model_name, language=_as_list(language), license=license, tags=tags, finetuned_from=finetuned_from,
        tasks=_as_list(tasks), dataset=dataset, dataset_tags=dataset_tags, dataset_args=dataset_args,
        dataset_metadata=metadata, eval_results=eval_results, eval_lines=eval_lines,
        hyperparameters=training_hyperparameters(trainer),
        framework_versions=framework_versions(trainer.backend.name, _is_torch_module(trainer.model)),
    )


def read_card_metadata(path: str) -> dict[str, Any]:
    """The YAML metadata of an existing README.md (empty when it has none)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    loaded = yaml.safe_load(text[3:end])
    return loaded if isinstance(loaded, dict) else {}


def write_model_card(trainer: Any, **kwargs) -> str:
    """Writes output_dir/README.md for `trainer` and returns its path.

    Tags already in an existing README.md are kept (added after the given ones), as transformers does.
    """
    path = os.path.join(trainer.args.output_dir, "README.md")
    if os.path.exists(path):
        existing = _as_list(read_card_metadata(path).get("tags"))
        if existing:
            tags = _as_list(kwargs.get("tags"))
            kwargs["tags"] = tags + [t for t in existing if t not in tags]
    card = summary_from_trainer(trainer, **kwargs).to_markdown()
    os.makedirs(trainer.args.output_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(card)
    return path


__all__ = ["TrainingSummary", "markdown_table", "parse_log_history", "summary_from_trainer", "training_hyperparameters",
           "write_model_card"]
