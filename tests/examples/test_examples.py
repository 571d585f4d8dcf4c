"""The example scripts, run as a user runs them (a subprocess, small step counts), on each backend
this lane has: exit code 0, the printed and written metrics, a loss that fell, and a saved model
that its own library loads.

Each run uses one CPU device and unoptimised XLA compiles (the models are tiny, so LLVM
optimisation would be most of the compile time); the JAX tests elsewhere use 8 fake devices.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPO, "examples")
HAS_TORCH_XLA = importlib.util.find_spec("torch_xla") is not None
HAS_TORCHAX = importlib.util.find_spec("torchax") is not None
needs_torch_xla = pytest.mark.skipif(not HAS_TORCH_XLA, reason="torch_xla is not installed (XLA lane only)")
needs_torchax = pytest.mark.skipif(not HAS_TORCHAX, reason="torchax is not installed (XLA lane only)")


def run_example(script: str, output_dir, *args: str, timeout: int = 420) -> tuple[dict, str]:
    """Runs examples/<script> with args; returns (example_results.json, stdout+stderr)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_backend_optimization_level=0"])
    env.update({"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "1", "TOKENIZERS_PARALLELISM": "false"})
    cmd = [sys.executable, os.path.join(EXAMPLES, script), "--output_dir", str(output_dir),
           "--disable_tqdm", "true", *args]
    proc = subprocess.run(cmd, env=env, cwd=str(output_dir.parent), capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-6000:]}"
    with open(os.path.join(output_dir, "example_results.json")) as f:
        return json.load(f), log


# The torch backend's run (transformers' Llama) is the local-file test below.
CLM_RUNS = {
    "jax-reference": ("--backend", "jax"),
    "torch_xla-hf-gpt2": pytest.param(("--backend", "torch_xla", "--hf_architecture", "gpt2"), marks=needs_torch_xla),
    "jax-torchax-gpt2": pytest.param(("--backend", "jax", "--model_kind", "hf", "--hf_architecture", "gpt2"),
                                     marks=needs_torchax),
}


@pytest.mark.parametrize("args", CLM_RUNS.values(), ids=CLM_RUNS.keys())
def test_run_clm_learns_and_saves_a_loadable_model(tmp_path, args):
    out = tmp_path / "clm"
    results, log = run_example("run_clm.py", out, *args, "--max_steps", "20", "--logging_steps", "10",
                               "--num_train_lines", "3000", "--num_eval_lines", "100", "--num_samples", "2")
    backend = args[1]
    assert results["backend"] == backend and results["global_step"] == 20
    # Untrained, the model is close to uniform over the 15 characters (ln 15 = 2.71); 20 steps must
    # at least learn the line format ("+", "=", newline after digits).
    assert results["eval_loss_before"] > 2.4, results
    assert results["eval_loss_after"] < results["eval_loss_before"] - 0.5, results
    assert results["perplexity_after"] == pytest.approx(np.exp(results["eval_loss_after"]), rel=1e-6)
    assert "perplexity_before" in log and "eval_loss_after" in log and "held-out prompts" in log
    assert len(results["samples"]) == 2 and results["samples"][0]["prompt"].endswith("=")

    import torch
    import transformers

    vocab = json.load(open(out / "vocab.json"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.vocab_size == len(vocab["symbols"]) == results["vocab_size"]
    ids = torch.tensor([[vocab["symbols"].index(c) for c in "12+7=19\n3+4"]])
    with torch.no_grad():
        torch_logits = reloaded(ids).logits.numpy()
    if "--model_kind" not in args and backend == "jax":
        # The reference model's export also loads as xtrainer's own Flax model, with the same logits.
        from xtrainer.models import LlamaForCausalLM, from_pretrained

        flax_model = from_pretrained(str(out))
        assert isinstance(flax_model, LlamaForCausalLM)
        from flax import nnx

        # One compile for the whole forward, not one per eager op.
        flax_logits = nnx.jit(lambda model, x: model(x)["logits"])(flax_model, ids.numpy())
        np.testing.assert_allclose(np.asarray(flax_logits), torch_logits, atol=2e-4)
    else:
        expected = "GPT2LMHeadModel" if "gpt2" in args else "LlamaForCausalLM"
        assert type(reloaded).__name__ == expected


def _example_module(name: str):
    """Imports examples/<name>.py in this process (for the cheap checks that need no fresh process)."""
    sys.path.insert(0, EXAMPLES)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(EXAMPLES)


def test_run_clm_on_a_local_text_file_with_word_tokens_on_torch(tmp_path):
    text_file = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    # A tiny grammar: subject verb object, where the verb decides the object's word list.
    verbs = {"eats": ["apples", "bread", "soup"], "reads": ["books", "letters", "news"]}
    lines = [f"{rng.choice(['anna', 'bob', 'carl'])} {v} {rng.choice(verbs[v])} ."
             for v in rng.choice(list(verbs), size=1500)]
    text_file.write_text("\n".join(lines))
    out = tmp_path / "clm"
    results, log = run_example("run_clm.py", out, "--backend", "torch", "--train_file", str(text_file),
                               "--tokenizer_level", "word", "--block_size", "16", "--max_steps", "20",
                               "--num_samples", "1")
    assert results["backend"] == "torch" and results["global_step"] == 20
    vocab = json.load(open(out / "vocab.json"))
    assert vocab["level"] == "word" and {"anna", "eats", "news", "."} <= set(vocab["symbols"])
    assert results["vocab_size"] == len(vocab["symbols"]) == 2 + 3 + 2 + 6 + 1
    # Untrained: about ln(14) = 2.64 per word; in the grammar the verb limits the object to 3 words
    # and "." always follows it, which 20 steps start to learn.
    assert results["eval_loss_after"] < results["eval_loss_before"] - 0.5, results
    assert "sample_accuracy" not in results  # only the generated corpus has known answers
    assert "perplexity_after" in log and "held-out prompts" in log

    import transformers

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == "LlamaForCausalLM" and reloaded.config.vocab_size == results["vocab_size"]


def test_reference_model_on_a_torch_backend_is_refused_with_a_hint(tmp_path):
    with pytest.raises(SystemExit, match="--model_kind reference is a Flax model.*--model_kind hf"):
        _example_module("run_classification").main(
            ["--backend", "torch", "--model_kind", "reference", "--output_dir", str(tmp_path)])


CLS_RUNS = {
    "jax-reference": ("--backend", "jax"),
    "torch-hf": ("--backend", "torch"),
    "torch_xla-hf": pytest.param(("--backend", "torch_xla"), marks=needs_torch_xla),
}


@pytest.mark.parametrize("args", CLS_RUNS.values(), ids=CLS_RUNS.keys())
def test_run_classification_beats_chance_and_saves_a_loadable_model(tmp_path, args):
    out = tmp_path / "cls"
    results, log = run_example("run_classification.py", out, *args, "--max_steps", "50", "--learning_rate", "5e-3",
                               "--per_device_train_batch_size", "64", "--num_train_examples", "3200",
                               "--logging_steps", "10")
    backend = args[1]
    assert results["backend"] == backend and results["global_step"] == 50
    assert results["majority_class_accuracy"] == pytest.approx(0.5, abs=0.06)
    assert results["eval_accuracy_before"] < 0.65, results  # untrained: about chance
    assert results["eval_accuracy_after"] > 0.75, results  # compute_metrics' accuracy, well above chance
    assert results["eval_loss_after"] < results["eval_loss_before"] - 0.1, results
    assert "eval_accuracy" in log and "eval_f1" in log
    assert {r["label"] for r in results["showcase"]} <= {"negative", "positive"}

    import transformers

    reloaded = transformers.BertForSequenceClassification.from_pretrained(out)
    assert reloaded.config.id2label == {0: "negative", 1: "positive"}
    if backend == "jax":
        from xtrainer.models import BertForSequenceClassification, from_pretrained

        flax_model = from_pretrained(str(out))
        assert isinstance(flax_model, BertForSequenceClassification)
        assert flax_model.config.label_names == ("negative", "positive")
