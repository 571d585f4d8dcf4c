"""Text classification with xtrainer, in the style of transformers' run_glue.py / run_classification.py.

A small BERT-style encoder learns to label short reviews. By default the reviews are generated:
filler words ("the plot was ...") with one to three sentiment words from a positive and a negative
list, labelled by the polarity that occurs more often. The accuracy goes from chance (~0.5) to well
above 0.95 within 200 steps on a CPU. `--train_file data.jsonl` (or .csv/.tsv with `text` and
`label` columns) trains on your own data; the last `--validation_fraction` rows are the eval set.

Models (built from a small config; nothing is downloaded):
  --model_kind reference   xtrainer's Flax NNX BERT (`xtrainer.models.BertForSequenceClassification`): jax
  --model_kind hf          transformers' BertForSequenceClassification: torch, torch_xla, or jax via torchax
The default is `reference` on the jax backend and `hf` on the torch backends.

    python examples/run_classification.py --backend jax --output_dir /tmp/cls-jax
    python examples/run_classification.py --backend torch --output_dir /tmp/cls-torch
    python examples/run_classification.py --backend torch_xla --max_steps 100

Prints eval loss/accuracy/F1 (through `compute_metrics`) before and after training, writes the model
with `save_model` (transformers' format; reference models also load with
`xtrainer.models.from_pretrained`), vocab.json and example_results.json into --output_dir.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _example_utils, when run as a script
from _example_utils import (  # noqa: E402
    SimpleTokenizer,
    finish_example,
    parse_example_args,
    platform_env_defaults,
    resolve_model_kind,
)

platform_env_defaults()  # before jax / torch_xla are imported

POSITIVE = ["good", "great", "excellent", "superb", "wonderful", "delightful", "brilliant", "enjoyable"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "dreadful", "poor", "dull", "weak"]
FILLER = ["the", "film", "was", "acting", "plot", "and", "a", "story", "music", "with", "but", "it", "this",
          "movie", "cast", "ending", "really", "quite", "very", "of", "script", "scenes", "at", "times"]
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
# Hand-written sentences that the trained model labels at the end (reloaded with transformers).
SHOWCASE = ["the acting was superb and the music wonderful", "a dull plot and a terrible ending",
            "the story was good but the cast was weak and the script boring", "really great movie"]


@dataclass
class ModelArguments:
    """Which encoder to build, and its (small) size."""

    model_kind: str | None = field(default=None, metadata={
        "help": "reference (xtrainer's Flax BERT; jax) or hf (transformers' torch BERT). "
                "Default: reference on jax/auto, hf on torch/torch_xla.", "choices": ["reference", "hf"]})
    hidden_size: int = field(default=64, metadata={"help": "Encoder width."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Encoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    intermediate_size: int = field(default=128, metadata={"help": "MLP width."})
    # Off by default: the generated task has no noise to overfit to within a few hundred steps.
    dropout: float = field(default=0.0, metadata={"help": "Hidden and attention dropout (BERT uses 0.1)."})


@dataclass
class DataArguments:
    """Where the labelled text comes from and how it is padded."""

    train_file: str | None = field(default=None, metadata={
        "help": "A .jsonl/.csv/.tsv file with `text` and `label` columns. Default: generated reviews."})
    max_seq_length: int = field(default=24, metadata={"help": "Tokens per example after [CLS]/[SEP], padded."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Tail of --train_file used for evaluation."})
    num_train_examples: int = field(default=4000, metadata={"help": "Generated data: training reviews."})
    num_eval_examples: int = field(default=256, metadata={"help": "Generated data: evaluation reviews."})


SCRIPT_DEFAULTS = {
    # A tiny encoder trained from scratch wants a much larger step size than fine-tuning's 5e-5.
    "learning_rate": 3e-3, "warmup_steps": 0.1, "lr_scheduler_type": "linear", "weight_decay": 0.01,
    "max_steps": 200, "per_device_train_batch_size": 32, "per_device_eval_batch_size": 64,
    "logging_steps": 25, "save_strategy": "no", "report_to": "none",
    "output_dir": os.path.join(tempfile.gettempdir(), "xtrainer-run_classification"),
}


def generate_reviews(n: int, seed: int, max_words: int) -> list[dict]:
    """n reviews {"text", "label"}: filler plus 1-3 majority sentiment words and fewer minority ones."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        majority, minority = (POSITIVE, NEGATIVE) if label == 1 else (NEGATIVE, POSITIVE)
        n_major = int(rng.integers(1, 4))
        n_minor = int(rng.integers(0, n_major))
        words = [str(w) for w in rng.choice(FILLER, size=int(rng.integers(4, max_words - n_major - n_minor + 1)))]
        for w in [*rng.choice(majority, n_major), *rng.choice(minority, n_minor)]:
            words.insert(int(rng.integers(0, len(words) + 1)), str(w))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def read_labelled_file(path: str) -> list[dict]:
    """Rows {"text", "label"} from .jsonl, .csv or .tsv (labels as given: names or integers)."""
    with open(path, encoding="utf-8", newline="") as f:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))
    missing = [i for i, r in enumerate(rows) if "text" not in r or "label" not in r]
    if missing:
        raise SystemExit(f"{path}: rows {missing[:5]} lack a `text` or `label` column")
    return [{"text": r["text"], "label": r["label"]} for r in rows]


def load_data(data_args: DataArguments, seed: int) -> tuple[list[dict], list[dict], list[str]]:
    """(train rows, eval rows, label names) with integer labels."""
    if data_args.train_file is None:
        max_words = data_args.max_seq_length - 2
        train = generate_reviews(data_args.num_train_examples, seed, max_words)
        evaluation = generate_reviews(data_args.num_eval_examples, seed + 1, max_words)
        return train, evaluation, ["negative", "positive"]
    rows = read_labelled_file(data_args.train_file)
    names = sorted({str(r["label"]) for r in rows})
    for r in rows:
        r["label"] = names.index(str(r["label"]))
    cut = int(len(rows) * (1 - data_args.validation_fraction))
    return rows[:cut], rows[cut:], names


def encode(rows: list[dict], tokenizer: SimpleTokenizer, max_seq_length: int) -> list[dict]:
    """[CLS] words [SEP], truncated and padded to max_seq_length (static shapes for XLA)."""
    cls_id, sep_id, pad_id = (tokenizer.token_id(s) for s in ("[CLS]", "[SEP]", "[PAD]"))
    out = []
    for r in rows:
        ids = [cls_id, *tokenizer.encode(r["text"])[: max_seq_length - 2], sep_id]
        mask = [1] * len(ids) + [0] * (max_seq_length - len(ids))
        ids += [pad_id] * (max_seq_length - len(ids))
        out.append({"input_ids": np.asarray(ids, np.int64), "attention_mask": np.asarray(mask, np.int64),
                    "token_type_ids": np.zeros(max_seq_length, np.int64), "labels": np.int64(r["label"])})
    return out


def build_model(model_args: ModelArguments, kind: str, vocab_size: int, max_seq_length: int,
                label_names: list[str], seed: int):
    """xtrainer's Flax BERT classifier (kind "reference") or transformers' (kind "hf"), same config."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=model_args.hidden_size, num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads, intermediate_size=model_args.intermediate_size,
        hidden_dropout_prob=model_args.dropout, attention_probs_dropout_prob=model_args.dropout,
        max_position_embeddings=max_seq_length, pad_token_id=0,
        id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    if kind == "reference":
        from flax import nnx

        from xtrainer.models import BertConfig, BertForSequenceClassification

        return BertForSequenceClassification(BertConfig.from_hf(config), rngs=nnx.Rngs(seed))
    import torch

    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config)


def compute_metrics(eval_pred) -> dict[str, float]:
    """Accuracy and macro F1 from the logits."""
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    preds = np.asarray(logits).argmax(-1)
    labels = np.asarray(eval_pred.label_ids)
    f1s = []
    for c in np.unique(np.concatenate([labels, preds])):
        tp = np.sum((preds == c) & (labels == c))
        precision = tp / max(1, np.sum(preds == c))
        recall = tp / max(1, np.sum(labels == c))
        f1s.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    return {"accuracy": float(np.mean(preds == labels)), "f1": float(np.mean(f1s))}


def classify_with_transformers(model_dir: str, tokenizer: SimpleTokenizer, texts: list[str],
                               max_seq_length: int) -> list[dict]:
    """Labels texts with the exported model reloaded by transformers (works for every backend's export)."""
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    batch = encode([{"text": t, "label": 0} for t in texts], tokenizer, max_seq_length)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    inputs = {k: torch.as_tensor(np.stack([b[k] for b in batch])) for k in keys}
    with torch.no_grad():
        predicted = model(**inputs).logits.argmax(-1).tolist()
    return [{"text": t, "label": model.config.id2label[p]} for t, p in zip(texts, predicted)]


def main(argv: list[str] | None = None) -> dict:
    """Runs the example; returns the results it writes to example_results.json."""
    model_args, data_args, training_args = parse_example_args((ModelArguments, DataArguments), SCRIPT_DEFAULTS, argv)

    from xtrainer import Trainer, set_seed

    set_seed(training_args.seed)
    kind = resolve_model_kind(model_args.model_kind, training_args.backend)

    train_rows, eval_rows, label_names = load_data(data_args, training_args.seed)
    tokenizer = SimpleTokenizer.build((r["text"] for r in train_rows), level="word", specials=SPECIALS)
    train_dataset = encode(train_rows, tokenizer, data_args.max_seq_length)
    eval_dataset = encode(eval_rows, tokenizer, data_args.max_seq_length)
    majority = max(np.mean([r["label"] == c for r in eval_rows]) for c in range(len(label_names)))
    print(f"data: {'file ' + data_args.train_file if data_args.train_file else 'generated reviews'}; "
          f"labels {label_names}; vocabulary {tokenizer.vocab_size} words; {len(train_dataset)} train / "
          f"{len(eval_dataset)} eval examples; majority-class accuracy {majority:.3f}")

    model = build_model(model_args, kind, tokenizer.vocab_size, data_args.max_seq_length, label_names,
                        training_args.seed)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      compute_metrics=compute_metrics)
    print(f"backend: {trainer.backend.name}; model: {type(model).__module__}.{type(model).__name__}")

    before = trainer.evaluate()
    start = time.time()
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_seconds = time.time() - start
    after = trainer.evaluate()
    trainer.save_model()

    results = {
        "backend": trainer.backend.name,
        "model": f"{type(model).__module__}.{type(model).__name__}",
        "global_step": train_result.global_step,
        "train_loss": float(train_result.training_loss),
        "train_seconds": round(train_seconds, 2),
        "majority_class_accuracy": float(majority),
        "eval_loss_before": float(before["eval_loss"]),
        "eval_loss_after": float(after["eval_loss"]),
        "eval_accuracy_before": float(before["eval_accuracy"]),
        "eval_accuracy_after": float(after["eval_accuracy"]),
        "eval_f1_after": float(after["eval_f1"]),
        "saved_model": training_args.output_dir,
    }
    if trainer.is_world_process_zero():
        tokenizer.save(training_args.output_dir)
        trainer.save_state()
        if data_args.train_file is None:
            showcase = classify_with_transformers(training_args.output_dir, tokenizer, SHOWCASE,
                                                  data_args.max_seq_length)
            print("\nthe saved model, reloaded with transformers:")
            for row in showcase:
                print(f"  {row['label']:>8}: {row['text']}")
            results["showcase"] = showcase
    finish_example(training_args.output_dir, results, trainer.is_world_process_zero())
    return results


if __name__ == "__main__":
    main()
