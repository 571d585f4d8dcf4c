"""examples/run_seq2seq.py run as a user runs it (a subprocess): generated exact match is written and,
given a few minutes (slow), rises far above chance."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "run_seq2seq.py")


def run_seq2seq(output_dir, *args: str, timeout: int = 900) -> tuple[dict, str]:
    """Runs the example; returns (example_results.json, its output)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_backend_optimization_level=0"])
    env.update({"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "1"})
    cmd = [sys.executable, SCRIPT, "--output_dir", str(output_dir), "--disable_tqdm", "true", *args]
    proc = subprocess.run(cmd, env=env, cwd=str(output_dir.parent), capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-6000:]}"
    with open(os.path.join(output_dir, "example_results.json")) as f:
        return json.load(f), log


def test_run_seq2seq_torch_writes_generated_metrics(tmp_path):
    out = tmp_path / "s2s"
    results, log = run_seq2seq(out, "--backend", "torch", "--max_steps", "8", "--logging_steps", "4",
                               "--num_train_examples", "512", "--num_eval_examples", "16", "--num_samples", "2")
    assert results["backend"] == "torch" and results["global_step"] == 8
    assert isinstance(results["eval_exact_match"], float) and 0.0 <= results["eval_exact_match"] <= 1.0
    assert 0.0 < results["chance_exact_match"] < 1e-3
    assert len(results["samples"]) == 2 and all(set(s["generated"]) <= set("0123456789") for s in results["samples"])
    assert "chance exact match" in log
    assert os.path.isfile(out / "model.safetensors") and os.path.isfile(out / "vocab.json")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["reverse", "spell"])
def test_run_seq2seq_learns_far_above_chance(tmp_path, task):
    results, _ = run_seq2seq(tmp_path / task, "--backend", "torch", "--task", task)
    assert results["eval_exact_match"] > 0.5, results
    assert results["eval_exact_match"] > 1000 * results["chance_exact_match"]
    assert results["eval_exact_match_before"] < 0.05


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="torch_xla is only in the XLA lane")
def test_run_seq2seq_torch_xla(tmp_path):
    results, _ = run_seq2seq(tmp_path / "xla", "--backend", "torch_xla", "--max_steps", "20",
                             "--num_train_examples", "2000", "--num_eval_examples", "32")
    assert results["backend"] == "torch_xla" and results["global_step"] == 20
    assert 0.0 <= results["eval_exact_match"] <= 1.0


@pytest.mark.slow
def test_run_seq2seq_jax_reference_learns(tmp_path):
    # xtrainer's Flax T5 on the jax backend, generating with H5's jitted search (about 1.5 CPU minutes).
    results, _ = run_seq2seq(tmp_path / "jax", "--backend", "jax")
    assert results["backend"] == "jax" and results["model_kind"] == "reference" and results["global_step"] == 300
    assert results["eval_exact_match"] > 0.5, results
