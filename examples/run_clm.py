"""Causal language modelling with xtrainer, in the style of transformers' run_clm.py.

A small decoder learns a text corpus character by character (or word by word). By default the
corpus is generated: lines of additions such as "7+5=12" whose answers are learnable, so the
perplexity falls from the vocabulary size towards the entropy of the random operands, and the
reloaded model completes held-out prompts like "3+5=" correctly. `--train_file my.txt` trains on a
local text file instead (the last `--validation_fraction` of it is the evaluation set).

Models (nothing is downloaded; every model is built from a small config):
  --model_kind reference   xtrainer's Flax NNX Llama (`xtrainer.models.LlamaForCausalLM`): backend jax
  --model_kind hf          transformers' LlamaForCausalLM or GPT2LMHeadModel (--hf_architecture):
                           backend torch, torch_xla, or jax (through torchax)
The default is `reference` on the jax backend and `hf` on the torch backends.

    python examples/run_clm.py --backend jax   --output_dir /tmp/clm-jax
    python examples/run_clm.py --backend torch --hf_architecture gpt2 --output_dir /tmp/clm-torch
    python examples/run_clm.py --backend torch_xla --max_steps 100     # PJRT CPU unless on a TPU VM
    python examples/run_clm.py --backend jax --tpu_config v5e-1 --bf16_model   # a Colab TPU

Prints eval loss and perplexity before and after training, writes the model with `save_model`
(config.json + model.safetensors that `transformers.AutoModelForCausalLM.from_pretrained` loads),
the vocabulary (vocab.json) and `example_results.json` into --output_dir.
"""

from __future__ import annotations

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
    perplexity,
    platform_env_defaults,
    resolve_model_kind,
)

platform_env_defaults()  # before jax / torch_xla are imported


@dataclass
class ModelArguments:
    """Which model to build, and its (small) size."""

    model_kind: str | None = field(default=None, metadata={
        "help": "reference (xtrainer's Flax Llama; jax) or hf (a transformers torch model). "
                "Default: reference on jax/auto, hf on torch/torch_xla.", "choices": ["reference", "hf"]})
    hf_architecture: str = field(default="llama", metadata={
        "help": "transformers model for --model_kind hf.", "choices": ["llama", "gpt2"]})
    hidden_size: int = field(default=64, metadata={"help": "Model width."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    intermediate_size: int = field(default=256, metadata={"help": "MLP width."})
    bf16_model: bool = field(default=False, metadata={
        "help": "Reference model: compute in bfloat16 (parameters stay float32). Use on TPU."})


@dataclass
class DataArguments:
    """Where the text comes from and how it is cut into training blocks."""

    train_file: str | None = field(default=None, metadata={
        "help": "A local UTF-8 text file. Default: a generated corpus of additions."})
    tokenizer_level: str = field(default="char", metadata={
        "help": "char: one token per character; word: whitespace-separated words.", "choices": ["char", "word"]})
    max_vocab_size: int = field(default=8192, metadata={"help": "Vocabulary cap (rarer symbols become [UNK])."})
    block_size: int = field(default=32, metadata={"help": "Tokens per training example."})
    validation_fraction: float = field(default=0.05, metadata={"help": "Tail of --train_file used for evaluation."})
    num_train_lines: int = field(default=20000, metadata={"help": "Generated corpus: training lines."})
    num_eval_lines: int = field(default=400, metadata={"help": "Generated corpus: evaluation lines."})
    max_operand: int = field(default=10, metadata={"help": "Generated corpus: operands are 0..max_operand-1."})
    num_samples: int = field(default=8, metadata={
        "help": "After training, complete this many held-out prompts with the reloaded model (0: skip)."})


SCRIPT_DEFAULTS = {
    # A tiny model trained from scratch wants a much larger step size than fine-tuning's 5e-5.
    "learning_rate": 3e-3, "warmup_steps": 0.05, "lr_scheduler_type": "cosine", "weight_decay": 0.01,
    "max_steps": 300, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 32,
    "logging_steps": 25, "save_strategy": "no", "report_to": "none",
    "output_dir": os.path.join(tempfile.gettempdir(), "xtrainer-run_clm"),
}


def addition_lines(n: int, max_operand: int, seed: int) -> list[str]:
    """n lines "a+b=c" with a, b drawn uniformly from [0, max_operand)."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, max_operand, size=(2, n))
    return [f"{x}+{y}={x + y}" for x, y in zip(a, b)]


def load_corpus(data_args: DataArguments, seed: int) -> tuple[str, str, list[tuple[str, str]]]:
    """(train text, eval text, [(prompt, expected completion)]) from the file or the generator."""
    if data_args.train_file:
        with open(data_args.train_file, encoding="utf-8") as f:
            text = f.read()
        cut = int(len(text) * (1 - data_args.validation_fraction))
        train, evaluation = text[:cut], text[cut:]
        # Prompts from the evaluation text, with what actually follows them as the reference.
        step = max(1, len(evaluation) // max(1, data_args.num_samples))
        prompts = [(evaluation[i: i + 24], evaluation[i + 24: i + 40]) for i in range(0, len(evaluation) - 40, step)]
        return train, evaluation, prompts[: data_args.num_samples]
    train = addition_lines(data_args.num_train_lines, data_args.max_operand, seed)
    evaluation = addition_lines(data_args.num_eval_lines, data_args.max_operand, seed + 1)
    prompts = [(line.split("=")[0] + "=", line.split("=")[1]) for line in evaluation[: data_args.num_samples]]
    return "\n".join(train) + "\n", "\n".join(evaluation) + "\n", prompts


def make_blocks(ids: list[int], block_size: int) -> list[dict]:
    """Cuts a token stream into full blocks (the remainder is dropped), labels = input_ids."""
    usable = len(ids) // block_size * block_size
    blocks = np.asarray(ids[:usable], dtype=np.int64).reshape(-1, block_size)
    return [{"input_ids": row, "labels": row.copy()} for row in blocks]


def hf_config(model_args: ModelArguments, architecture: str, vocab_size: int, block_size: int):
    """A small transformers config for the requested architecture."""
    import transformers

    if architecture == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=block_size, n_embd=model_args.hidden_size,
            n_layer=model_args.num_hidden_layers, n_head=model_args.num_attention_heads,
            n_inner=model_args.intermediate_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0, pad_token_id=0)
    heads = model_args.num_attention_heads
    return transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=model_args.hidden_size, intermediate_size=model_args.intermediate_size,
        num_hidden_layers=model_args.num_hidden_layers, num_attention_heads=heads,
        num_key_value_heads=heads // 2 if heads % 2 == 0 else heads, max_position_embeddings=block_size,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def build_model(model_args: ModelArguments, kind: str, vocab_size: int, block_size: int, seed: int):
    """The reference Flax Llama (kind "reference") or a transformers torch model (kind "hf")."""
    if kind == "reference":
        import jax.numpy as jnp
        from flax import nnx

        from xtrainer.models import LlamaConfig, LlamaForCausalLM

        overrides = {"dtype": jnp.bfloat16} if model_args.bf16_model else {}
        config = LlamaConfig.from_hf(hf_config(model_args, "llama", vocab_size, block_size), **overrides)
        return LlamaForCausalLM(config, rngs=nnx.Rngs(seed))
    import torch
    import transformers

    torch.manual_seed(seed)
    config = hf_config(model_args, model_args.hf_architecture, vocab_size, block_size)
    cls = transformers.GPT2LMHeadModel if model_args.hf_architecture == "gpt2" else transformers.LlamaForCausalLM
    return cls(config)


def complete_prompts(model_dir: str, tokenizer: SimpleTokenizer, prompts: list[tuple[str, str]],
                     newline_stops: bool) -> list[dict]:
    """Greedy completions from the exported model, reloaded with transformers (any backend's export).

    Runs a plain forward per new token on CPU: the point is to show that the saved model is a
    working transformers model, not to be fast.
    """
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    newline = tokenizer.id_of.get("\n")
    out = []
    with torch.no_grad():
        for prompt, expected in prompts:
            ids = tokenizer.encode(prompt)
            new = []
            for _ in range(len(tokenizer.encode(expected)) + 1):
                next_id = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if newline_stops and next_id == newline:
                    break
                new.append(next_id)
            completion = tokenizer.decode(new)
            out.append({"prompt": prompt, "completion": completion, "expected": expected,
                        "correct": completion.strip() == expected.strip()})
    return out


def main(argv: list[str] | None = None) -> dict:
    """Runs the example; returns the results it writes to example_results.json."""
    model_args, data_args, training_args = parse_example_args((ModelArguments, DataArguments), SCRIPT_DEFAULTS, argv)

    from xtrainer import Trainer, set_seed

    set_seed(training_args.seed)
    kind = resolve_model_kind(model_args.model_kind, training_args.backend)

    train_text, eval_text, prompts = load_corpus(data_args, training_args.seed)
    tokenizer = SimpleTokenizer.build([train_text], level=data_args.tokenizer_level, max_size=data_args.max_vocab_size)
    train_dataset = make_blocks(tokenizer.encode(train_text), data_args.block_size)
    eval_dataset = make_blocks(tokenizer.encode(eval_text), data_args.block_size)
    if not train_dataset or not eval_dataset:
        raise SystemExit(f"not enough text for one block of {data_args.block_size} tokens in the train and eval parts")
    print(f"corpus: {'file ' + data_args.train_file if data_args.train_file else 'generated additions'}; "
          f"vocabulary {tokenizer.vocab_size} ({data_args.tokenizer_level}); "
          f"{len(train_dataset)} train / {len(eval_dataset)} eval blocks of {data_args.block_size} tokens")

    model = build_model(model_args, kind, tokenizer.vocab_size, data_args.block_size, training_args.seed)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset)
    print(f"backend: {trainer.backend.name}; model: {type(model).__module__}.{type(model).__name__} "
          f"({sum(int(np.prod(p.shape)) for p in _parameters(model)):,} parameters)")

    before = trainer.evaluate()
    start = time.time()
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_seconds = time.time() - start
    after = trainer.evaluate()

    trainer.save_model()
    results = {
        "backend": trainer.backend.name,
        "model": f"{type(model).__module__}.{type(model).__name__}",
        "vocab_size": tokenizer.vocab_size,
        "global_step": train_result.global_step,
        "train_loss": float(train_result.training_loss),
        "train_seconds": round(train_seconds, 2),
        "eval_loss_before": float(before["eval_loss"]),
        "eval_loss_after": float(after["eval_loss"]),
        "perplexity_before": perplexity(before["eval_loss"]),
        "perplexity_after": perplexity(after["eval_loss"]),
        "saved_model": training_args.output_dir,
    }
    if trainer.is_world_process_zero():
        tokenizer.save(training_args.output_dir)
        trainer.save_state()
        if data_args.num_samples > 0 and prompts:
            samples = complete_prompts(training_args.output_dir, tokenizer, prompts,
                                       newline_stops=data_args.train_file is None)
            print("\nheld-out prompts, completed by the saved model reloaded with transformers:")
            for s in samples:
                print(f"  {s['prompt']!r} -> {s['completion']!r} (expected {s['expected']!r})")
            if data_args.train_file is None:
                results["sample_accuracy"] = sum(s["correct"] for s in samples) / len(samples)
            results["samples"] = samples
    finish_example(training_args.output_dir, results, trainer.is_world_process_zero())
    return results


def _parameters(model):
    """The model's parameter arrays/tensors (Flax NNX or torch), for the parameter count."""
    if hasattr(model, "parameters"):
        return list(model.parameters())
    import jax
    from flax import nnx

    return jax.tree.leaves(nnx.state(model, nnx.Param))


if __name__ == "__main__":
    main()
