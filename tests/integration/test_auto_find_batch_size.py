"""auto_find_batch_size (xtrainer/auto_batch.py): out of memory restarts training with a smaller batch.

torch: an injected torch.OutOfMemoryError, reduced by accelerate's rule (x0.9), as transformers does.
jax: a fake device-memory limit; the compiled step is checked against it and the largest batch whose
step fits is found by compiling smaller ones (planning/fit.py). torch_xla: an injected RESOURCE_EXHAUSTED.
"""

import importlib.util

import numpy as np
import pytest
import torch

import xtrainer
from helpers import RegressionModel, regression_data
from xtrainer.auto_batch import is_out_of_memory, next_batch_size

HAS_XLA = importlib.util.find_spec("torch_xla") is not None

COMMON = dict(max_steps=2, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
              auto_find_batch_size=True)


def _record_rows(trainer, fail_above: int, error):
    """Makes train steps over more than `fail_above` rows per device raise `error`; returns the rows of each
    step tried, in order."""
    seen = []
    shard, step = trainer.backend.shard_window, trainer.backend.train_step

    def shard_window(window):
        rows = len(next(iter(window[0].values()))) // trainer.backend.local_batch_devices
        return rows, shard(window)

    def train_step(state, device_window, num_items, events):
        rows, inner = device_window
        seen.append(rows)
        if rows > fail_above:
            raise error()
        return step(state, inner, num_items, events)

    trainer.backend.shard_window, trainer.backend.train_step = shard_window, train_step
    return seen


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    assert is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("CUDA out of memory."))  # accelerate only reads RuntimeErrors
    assert next_batch_size(RuntimeError("x"), 16) == 14  # int(16 * 0.9), accelerate's rule


def test_torch_restarts_from_the_start_with_a_smaller_batch(tmp_path):
    args = xtrainer.TrainingArguments(str(tmp_path), backend="torch", per_device_train_batch_size=16, **COMMON)
    trainer = xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=regression_data(128))
    seen = _record_rows(trainer, 8, lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB"))
    output = trainer.train()
    # 16 -> 14 -> 12 -> 10 -> 9 -> 8 (x0.9 each time), then two steps of 8 rows.
    assert seen == [16, 14, 12, 10, 9, 8, 8]
    assert output.global_step == 2
    # As in transformers: the found batch is the Trainer's, the arguments stay as written.
    assert trainer._train_batch_size == 8 and trainer.state.train_batch_size == 8
    assert trainer.args.per_device_train_batch_size == 16
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2]


def test_resume_starts_from_the_checkpoints_batch_and_a_new_trainer_from_the_arguments(tmp_path):
    args = xtrainer.TrainingArguments(str(tmp_path), backend="torch", per_device_train_batch_size=16,
                                      **{**COMMON, "save_strategy": "steps", "save_steps": 1})
    first = xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=regression_data(128))
    _record_rows(first, 14, lambda: torch.OutOfMemoryError("CUDA out of memory."))
    first.train()
    assert first._train_batch_size == 14
    second = xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=regression_data(128))
    assert second._train_batch_size == 16  # the shared arguments were not changed by the first search
    seen = _record_rows(second, 0, lambda: torch.OutOfMemoryError("unused"))
    second.train(resume_from_checkpoint=True)
    assert second._train_batch_size == 14 and set(seen) <= {14}


def test_other_errors_are_not_retried(tmp_path):
    args = xtrainer.TrainingArguments(str(tmp_path), backend="torch", per_device_train_batch_size=4, **COMMON)
    trainer = xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=regression_data(32))
    _record_rows(trainer, 0, lambda: ValueError("a bug, not memory"))
    with pytest.raises(ValueError, match="a bug"):
        trainer.train()
    assert trainer._train_batch_size == 4 == trainer.args.per_device_train_batch_size


def test_no_batch_fits(tmp_path):
    args = xtrainer.TrainingArguments(str(tmp_path), backend="torch", per_device_train_batch_size=2, **COMMON)
    trainer = xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=regression_data(32))
    seen = _record_rows(trainer, 0, lambda: torch.OutOfMemoryError("CUDA out of memory."))
    with pytest.raises(RuntimeError, match="No executable batch size found, reached zero"):
        trainer.train()
    assert seen == [2, 1]


# ------------------------------------------------------------------ JAX: a fake device-memory limit


def _tiny_llama():
    from flax import nnx

    from xtrainer.models import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config, rngs=nnx.Rngs(0))


def _lm_rows(n, seq=32):
    rng = np.random.default_rng(0)
    return [{"input_ids": ids, "labels": ids} for ids in rng.integers(0, 64, (n, seq))]


@pytest.mark.slow  # eight compiles of the step: 23 s on an idle 2-core machine
def test_jax_plans_the_largest_batch_that_fits(tmp_path, monkeypatch):
    pytest.importorskip("flax")
    from xtrainer.planning.memory import StepMemory

    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax", per_device_train_batch_size=6, **COMMON)
    trainer = xtrainer.Trainer(model=_tiny_llama(), args=args, train_dataset=_lm_rows(256))
    backend = trainer.backend
    # The limit: halfway between what the step needs at 4 and at 5 rows per device, so 4 is the largest that fits.
    needs = {}
    for per_device in (4, 5):
        optimizer = backend.create_optimizer(trainer.model)
        state = backend.init_state(2, optimizer, backend.create_scheduler(2, optimizer))
        rows = _lm_rows(per_device * backend.local_batch_devices)
        window, mask, _ = backend.shard_window([{k: np.stack([r[k] for r in rows]) for k in rows[0]}])
        jitted = backend.jit_train_step({k: v.sharding for k, v in window.items()}, True)
        compiled = jitted.lower(state, window, mask, backend._replicate(np.float32(1))).compile()
        needs[per_device] = StepMemory.of(compiled).total
    assert needs[5] > needs[4]
    monkeypatch.setenv("XTRAINER_DEVICE_MEMORY_BYTES", str((needs[4] + needs[5]) // 2))
    trainer.train()
    assert trainer._train_batch_size == 4 and trainer.args.per_device_train_batch_size == 6
    assert trainer.state.global_step == 2 and trainer.state.train_batch_size == 4 * backend.local_batch_devices
    assert all(np.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


# ------------------------------------------------------------------ torch_xla (XLA lane)


@pytest.mark.skipif(not HAS_XLA, reason="torch_xla is not installed (XLA lane only)")
def test_torch_xla_restarts_after_resource_exhausted(tmp_path):
    args = xtrainer.TrainingArguments(str(tmp_path), backend="torch_xla", per_device_train_batch_size=4, **COMMON)
    trainer = xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=regression_data(64))
    seen = _record_rows(trainer, 2, lambda: RuntimeError(
        "Bad StatusOr access: RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm."))
    trainer.train()
    assert seen == [4, 3, 2, 2]
    assert trainer._train_batch_size == 2 and trainer.args.per_device_train_batch_size == 4
