"""The main job: a small, real causal-LM training run on built-in data.

By default the JAX backend trains xtrainer's reference Flax Llama (built from a config; nothing is
downloaded) on a synthetic language in which every sequence counts upward modulo the vocabulary
from a random start. The loss falls from ln(vocab) to near zero within a couple of hundred steps.
The run shows a progress bar, loss and tokens/s, writes a checkpoint, exports the weights in
transformers' format and reloads them with `transformers.LlamaForCausalLM.from_pretrained`.

    make demo                                  # JAX backend, reference Llama
    python examples/demo.py --backend torch    # the same model as transformers' LlamaForCausalLM
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import numpy as np


def counting_data(n: int, seq_len: int, vocab: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for start in rng.integers(0, vocab, size=n):
        ids = ((start + np.arange(seq_len)) % vocab).astype(np.int64)
        rows.append({"input_ids": ids, "labels": ids.copy()})
    return rows


def build_model(backend: str, vocab: int, seq_len: int):
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=seq_len, tie_word_embeddings=False,
    )
    if backend == "torch":
        import torch

        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(hf_config)
    from flax import nnx

    from xtrainer.models import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig.from_hf(hf_config), rngs=nnx.Rngs(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="jax", choices=["jax", "torch", "auto"])
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    cli = parser.parse_args()

    from xtrainer import Trainer, TrainingArguments

    vocab = 128
    output_dir = cli.output_dir or os.path.join(tempfile.gettempdir(), "xtrainer-demo")
    args = TrainingArguments(
        output_dir=output_dir,
        backend=cli.backend,
        max_steps=cli.max_steps,
        per_device_train_batch_size=cli.batch_size,
        learning_rate=3e-3,
        warmup_steps=0.1,
        lr_scheduler_type="cosine",
        logging_steps=max(1, cli.max_steps // 10),
        save_strategy="steps",
        save_steps=cli.max_steps,
        save_total_limit=2,
        eval_strategy="steps",
        eval_steps=max(1, cli.max_steps // 2),
        include_num_input_tokens_seen=True,
        disable_tqdm=False,
        report_to="none",
    )
    model = build_model(cli.backend, vocab, cli.seq_len)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=counting_data(4096, cli.seq_len, vocab, seed=1),
        eval_dataset=counting_data(128, cli.seq_len, vocab, seed=2),
    )
    print(f"backend: {trainer.backend.name}; model: {type(model).__module__}.{type(model).__name__}")
    start = time.time()
    result = trainer.train()
    elapsed = time.time() - start
    tokens = trainer.state.num_input_tokens_seen
    final_eval = trainer.evaluate()
    compile_s = getattr(trainer.backend, "compile_seconds", [0.0])
    print(f"\ntrain loss {result.training_loss:.4f}; eval loss {final_eval['eval_loss']:.4f} "
          f"(untrained: ln({vocab}) = {math.log(vocab):.2f})")
    print(f"throughput: {tokens / elapsed:,.0f} tokens/s over {result.global_step} steps in {elapsed:.1f} s"
          + (f" (first compile {compile_s[0]:.1f} s)" if compile_s and compile_s[0] else ""))
    checkpoint = os.path.join(output_dir, f"checkpoint-{result.global_step}")
    print(f"checkpoint: {checkpoint}: {sorted(os.listdir(checkpoint))}")

    export = os.path.join(output_dir, "export")
    trainer.save_model(export)
    import torch
    import transformers

    reloaded = transformers.LlamaForCausalLM.from_pretrained(export)
    with torch.no_grad():
        ids = torch.arange(8)[None, :]
        next_token = reloaded(ids).logits[0, -1].argmax().item()
    print(f"exported to {export} and reloaded with transformers.LlamaForCausalLM.from_pretrained: "
          f"after 0..7 it predicts {next_token} (expected 8)")
    if final_eval["eval_loss"] > 0.5 * math.log(vocab) or next_token != 8:
        raise SystemExit("The demo did not learn the counting language.")


if __name__ == "__main__":
    main()
