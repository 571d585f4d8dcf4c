"""Sequence-to-sequence training with xtrainer's Seq2SeqTrainer, in the style of transformers' run_translation.py.

A small T5 learns a synthetic task it makes itself, and is scored by exact match of what it
*generates* (`predict_with_generate`), before and after training, against the chance level:

  --task reverse   "40213"  -> "31204"          (characters, reversed)
  --task spell     "402"    -> "four zero two"  (digits spelled out as words)
  --task sort      "40213"  -> "01234"          (digits sorted)

Models (nothing is downloaded; every model is built from a small config):
  --model_kind hf          transformers' T5ForConditionalGeneration: backend torch, torch_xla, or jax
                           (through torchax)
  --model_kind reference   xtrainer's Flax NNX T5 (`xtrainer.models.T5ForConditionalGeneration`): backend jax
The default is `reference` on the jax backend and `hf` on the torch backends.

    python examples/run_seq2seq.py --backend torch --output_dir /tmp/s2s-torch
    python examples/run_seq2seq.py --backend jax --output_dir /tmp/s2s-jax
    python examples/run_seq2seq.py --backend torch_xla --max_steps 300     # PJRT CPU unless on a TPU VM
    python examples/run_seq2seq.py --task spell --generation_num_beams 2

Prints exact match before and after training (and chance), a few decoded predictions, and writes
`example_results.json` and the model (`save_model`) into --output_dir.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _example_utils, when run as a script
from _example_utils import finish_example, platform_env_defaults  # noqa: E402

platform_env_defaults()  # before jax / torch_xla are imported

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class ModelArguments:
    """Which T5 to build, and its (small) size."""

    model_kind: str | None = field(default=None, metadata={
        "help": "hf (transformers' T5, torch module) or reference (xtrainer's Flax T5; jax). "
                "Default: reference on jax/auto, hf on torch/torch_xla.", "choices": ["hf", "reference"]})
    d_model: int = field(default=64, metadata={"help": "Model width."})
    d_ff: int = field(default=256, metadata={"help": "Feed-forward width."})
    num_layers: int = field(default=2, metadata={"help": "Encoder and decoder layers (each)."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads (d_kv = d_model / num_heads)."})


@dataclass
class DataArguments:
    """The synthetic task."""

    task: str = field(default="reverse", metadata={
        "help": "reverse, spell or sort (see the module docstring).", "choices": ["reverse", "spell", "sort"]})
    min_digits: int = field(default=3, metadata={"help": "Shortest input (digits)."})
    max_digits: int = field(default=6, metadata={"help": "Longest input (digits)."})
    num_train_examples: int = field(default=20000, metadata={"help": "Training pairs."})
    num_eval_examples: int = field(default=200, metadata={"help": "Held-out pairs (evaluation)."})
    num_samples: int = field(default=5, metadata={"help": "Decoded predictions to print."})


# Defaults that train this tiny T5 from scratch in a few CPU minutes; the command line overrides them.
SCRIPT_DEFAULTS = dict(
    output_dir=os.path.join(tempfile.gettempdir(), "run_seq2seq"),
    max_steps=300,  # ~80% exact match on reverse (chance 3e-4)
    learning_rate=2e-3,
    warmup_steps=30,
    lr_scheduler_type="cosine",
    per_device_train_batch_size=64,
    per_device_eval_batch_size=100,
    logging_steps=50,
    eval_strategy="no",
    save_strategy="no",
    predict_with_generate=True,
    report_to="none",
    seed=0,
)


class DigitTokenizer:
    """One vocabulary for both sides: [PAD] [EOS] [UNK], the ten digits, the ten digit words.

    `encode` reads characters for digit strings and whitespace-separated words otherwise. The
    `pad_token_id` / `eos_token_id` attributes are what Seq2SeqTrainer pads generated ids with.
    """

    specials = ("[PAD]", "[EOS]", "[UNK]")

    def __init__(self):
        self.symbols = [*self.specials, *"0123456789", *DIGIT_WORDS]
        self.id_of = {s: i for i, s in enumerate(self.symbols)}
        self.pad_token_id, self.eos_token_id, self.unk_token_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        """Ids of text followed by [EOS]."""
        pieces = text.split() if " " in text or text in DIGIT_WORDS else list(text)
        return [self.id_of.get(p, self.unk_token_id) for p in pieces] + [self.eos_token_id]

    def decode(self, ids) -> str:
        """Text up to the first [EOS], skipping pads and -100 (digits joined, words spaced)."""
        pieces = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id:
                break
            if 0 <= i < len(self.symbols) and self.symbols[i] not in self.specials:
                pieces.append(self.symbols[i])
        return ("" if all(len(p) == 1 for p in pieces) else " ").join(pieces)

    def save_pretrained(self, directory: str) -> None:
        """Writes the vocabulary next to the model (save_model calls this)."""
        import json

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "vocab.json"), "w") as f:
            json.dump({"symbols": self.symbols}, f)


def make_pairs(task: str, n: int, min_digits: int, max_digits: int, seed: int) -> list[tuple[str, str]]:
    """n random (source, target) pairs of the task."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        digits = "".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(min_digits, max_digits + 1))))
        if task == "reverse":
            target = digits[::-1]
        elif task == "spell":
            target = " ".join(DIGIT_WORDS[int(d)] for d in digits)
        else:
            target = "".join(sorted(digits))
        pairs.append((digits, target))
    return pairs


def chance_exact_match(task: str, min_digits: int, max_digits: int) -> float:
    """Exact match of a guesser that knows the output length and alphabet (random digits otherwise)."""
    lengths = range(min_digits, max_digits + 1)
    if task == "sort":  # a sorted string is a multiset: fewer distinct outputs
        from math import comb

        return float(np.mean([1.0 / comb(n + 9, 9) for n in lengths]))
    return float(np.mean([10.0 ** -n for n in lengths]))


def encode_pairs(pairs, tokenizer: DigitTokenizer, source_len: int, target_len: int) -> list[dict]:
    """Fixed-length examples (static shapes for XLA): pads inputs with [PAD], labels with -100."""
    rows = []
    for source, target in pairs:
        ids, labels = tokenizer.encode(source), tokenizer.encode(target)
        input_ids = np.full(source_len, tokenizer.pad_token_id, dtype=np.int64)
        input_ids[: len(ids)] = ids
        mask = (np.arange(source_len) < len(ids)).astype(np.int64)
        padded_labels = np.full(target_len, -100, dtype=np.int64)
        padded_labels[: len(labels)] = labels
        rows.append({"input_ids": input_ids, "attention_mask": mask, "labels": padded_labels})
    return rows


def hf_t5_config(model_args: ModelArguments, vocab_size: int):
    import transformers

    return transformers.T5Config(
        vocab_size=vocab_size, d_model=model_args.d_model, d_ff=model_args.d_ff,
        d_kv=model_args.d_model // model_args.num_heads, num_layers=model_args.num_layers,
        num_decoder_layers=model_args.num_layers, num_heads=model_args.num_heads, dropout_rate=0.0,
        relative_attention_num_buckets=16, relative_attention_max_distance=32,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


def build_model(model_args: ModelArguments, kind: str, vocab_size: int, seed: int):
    """transformers' T5ForConditionalGeneration (kind "hf") or xtrainer's Flax T5 (kind "reference")."""
    config = hf_t5_config(model_args, vocab_size)
    if kind == "reference":
        from flax import nnx

        from xtrainer.models import T5Config, T5ForConditionalGeneration

        return T5ForConditionalGeneration(T5Config.from_hf(config), rngs=nnx.Rngs(seed))
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.T5ForConditionalGeneration(config)


def _pieces(text: str) -> list[str]:
    return text.split() if " " in text else list(text)


def exact_match_metric(tokenizer: DigitTokenizer):
    """compute_metrics over generated ids: exact match and per-token accuracy of the decoded strings."""

    def compute_metrics(pred) -> dict:
        preds, labels = np.asarray(pred.predictions), np.asarray(pred.label_ids)
        # Generated ids start with the decoder start token; cross-batch padding is -100.
        decoded = [tokenizer.decode(row[1:]) for row in preds]
        references = [tokenizer.decode(row) for row in np.where(labels < 0, tokenizer.pad_token_id, labels)]
        exact = [p == r for p, r in zip(decoded, references)]
        tokens = [np.mean([a == b for a, b in zip(_pieces(p), _pieces(r))] or [0.0]) if r else 0.0
                  for p, r in zip(decoded, references)]
        return {"exact_match": float(np.mean(exact)), "token_accuracy": float(np.mean(tokens))}

    return compute_metrics


def main(argv: list[str] | None = None) -> dict:
    """Runs the example; returns the results it writes to example_results.json."""
    from transformers import HfArgumentParser

    from xtrainer import Seq2SeqTrainer, Seq2SeqTrainingArguments, set_seed

    parser = HfArgumentParser((ModelArguments, DataArguments, Seq2SeqTrainingArguments))
    parser.set_defaults(**SCRIPT_DEFAULTS)
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 1 and args[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(os.path.abspath(args[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=args)
    set_seed(training_args.seed)
    kind = model_args.model_kind or ("reference" if training_args.backend in ("jax", "auto") else "hf")
    if kind == "reference" and training_args.backend not in ("jax", "auto"):
        raise SystemExit(f"--model_kind reference is a Flax model: it runs on --backend jax, not "
                         f"{training_args.backend!r}. Use --model_kind hf for the torch backends.")

    tokenizer = DigitTokenizer()
    source_len = data_args.max_digits + 1  # + [EOS]
    target_len = data_args.max_digits + 1  # one token per digit (or digit word) + [EOS]
    if training_args.generation_max_length is None:
        training_args.generation_max_length = target_len + 1  # + the decoder start token
    seed = training_args.seed
    train = encode_pairs(make_pairs(data_args.task, data_args.num_train_examples, data_args.min_digits,
                                    data_args.max_digits, seed), tokenizer, source_len, target_len)
    eval_pairs = make_pairs(data_args.task, data_args.num_eval_examples, data_args.min_digits,
                            data_args.max_digits, seed + 1)
    evaluation = encode_pairs(eval_pairs, tokenizer, source_len, target_len)

    model = build_model(model_args, kind, tokenizer.vocab_size, seed)
    trainer = Seq2SeqTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
        processing_class=tokenizer, compute_metrics=exact_match_metric(tokenizer),
    )
    chance = chance_exact_match(data_args.task, data_args.min_digits, data_args.max_digits)
    print(f"task={data_args.task} backend={trainer.backend.name} model={kind} "
          f"train={len(train)} eval={len(evaluation)} chance exact match={chance:.2e}")
    before = trainer.evaluate(metric_key_prefix="eval_before")
    print(f"before training: exact match {before['eval_before_exact_match']:.3f}")
    train_output = trainer.train()
    prediction = trainer.predict(evaluation, metric_key_prefix="eval")
    metrics = prediction.metrics
    samples = []
    for (source, target), row in list(zip(eval_pairs, prediction.predictions))[: data_args.num_samples]:
        generated = tokenizer.decode(row[1:])
        samples.append({"input": source, "target": target, "generated": generated, "correct": generated == target})
        print(f"  {source:>10} -> {generated!r:<32} ({'ok' if generated == target else 'expected ' + repr(target)})")
    trainer.save_model()
    results = {
        "task": data_args.task,
        "backend": trainer.backend.name,
        "model_kind": kind,
        "global_step": trainer.state.global_step,
        "train_loss": train_output.training_loss,
        "eval_loss": metrics.get("eval_loss"),
        "eval_exact_match_before": before["eval_before_exact_match"],
        "eval_exact_match": metrics["eval_exact_match"],
        "eval_token_accuracy": metrics["eval_token_accuracy"],
        "chance_exact_match": chance,
        "train_runtime": train_output.metrics.get("train_runtime"),
        "samples": samples,
    }
    finish_example(training_args.output_dir, results, trainer.is_world_process_zero())
    return results


if __name__ == "__main__":
    main()
