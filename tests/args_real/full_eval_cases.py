"""Shared cases of test_bf16_full_eval.py and test_fp16_full_eval.py: an evaluation outside train() runs the
model in the half dtype (as transformers casts it), an evaluation inside train() in the training precision."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers

import xtrainer
from helpers import lm_data

SEQ, VOCAB = 8, 64
DATA = lm_data(16, seq=SEQ, vocab=VOCAB)
FIELD = {torch.bfloat16: "bf16_full_eval", torch.float16: "fp16_full_eval"}


def gpt2():
    # A wide initialisation, so that half-precision rounding moves the loss well past float32 noise.
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.5)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def args(path, backend, dtype=None, per_device=8, **kw):
    fields = {FIELD[dtype]: True} if dtype is not None else {}
    return xtrainer.TrainingArguments(
        str(path), backend=backend, per_device_train_batch_size=per_device, per_device_eval_batch_size=per_device,
        report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=1, learning_rate=1e-2, **fields, **kw,
    )


def predict(model, path, backend, dtype=None, per_device=8) -> tuple[float, np.ndarray]:
    """(loss, logits as float32) of a predict() before any training."""
    trainer = xtrainer.Trainer(model=model, args=args(path, backend, dtype, per_device))
    out = trainer.predict(DATA)
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    return out.metrics["test_loss"], np.asarray(logits, np.float32)


def gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def torch_matches_transformers(tmp_path, dtype):
    """torch backend: the loss and logits of transformers' Trainer with the same field; the model ends up cast."""
    model = gpt2()
    hf_args = transformers.TrainingArguments(str(tmp_path / "hf"), use_cpu=True, per_device_eval_batch_size=8,
                                             report_to="none", **{FIELD[dtype]: True})
    expected = transformers.Trainer(model=copy.deepcopy(model), args=hf_args).predict(DATA)
    loss, logits = predict(model, tmp_path / "x", "torch", dtype)
    _, plain = predict(gpt2(), tmp_path / "p", "torch")
    assert loss == pytest.approx(expected.metrics["test_loss"], abs=1e-6)
    hf_logits = expected.predictions[0] if isinstance(expected.predictions, tuple) else expected.predictions
    assert gap(logits, np.asarray(hf_logits, np.float32)) == 0
    assert gap(logits, plain) > 1e-3  # ignoring the field gives the float32 logits
    assert {p.dtype for p in model.parameters()} == {dtype}  # cast in place, as transformers does


class _DtypeAtEvaluate(xtrainer.TrainerCallback):
    def __init__(self):
        self.dtypes = []

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.dtypes.append({str(p.dtype) for p in model.parameters()})


def torch_train_time_evaluation_keeps_training_precision(tmp_path, dtype):
    recorder = _DtypeAtEvaluate()
    model = gpt2()
    trainer = xtrainer.Trainer(model=model, args=args(tmp_path, "torch", dtype, max_steps=2, eval_strategy="steps",
                                                      eval_steps=1), train_dataset=DATA, eval_dataset=DATA,
                               callbacks=[recorder])
    trainer.train()
    trainer.evaluate()  # after train(): the field applies
    assert recorder.dtypes == [{"torch.float32"}, {"torch.float32"}, {str(dtype)}]


def torch_xla_evaluates_in_half_precision(tmp_path, dtype):
    """torch_xla: the logits of the model cast to the half dtype beforehand (XLA's half-precision arithmetic
    rounds differently from torch's CPU kernels, so that is the reference), far from the float32 ones."""
    pytest.importorskip("torch_xla")
    _, full = predict(gpt2(), tmp_path / "x", "torch_xla", dtype, per_device=2)
    _, cast = predict(gpt2().to(dtype), tmp_path / "c", "torch_xla", per_device=2)
    _, plain = predict(gpt2(), tmp_path / "p", "torch_xla", per_device=2)
    assert gap(full, cast) < 1e-6
    assert gap(full, plain) > 1e-3


def jax_reference_model_evaluates_with_half_precision_weights(tmp_path, dtype):
    """jax, xtrainer's Flax Llama: the eval step casts the weights (and float inputs) to the half dtype, as a
    bf16/fp16 training step does; the model then computes in its configured dtype."""
    pytest.importorskip("flax")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from xtrainer.models import LlamaConfig, LlamaForCausalLM

    def llama(rounded_to=None):
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=SEQ, initializer_range=0.5)
        model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
        if rounded_to is not None:
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            params = jax.tree.map(lambda p: p.astype(rounded_to).astype(jnp.float32), params)
            model = nnx.merge(graphdef, params, rest)
        return model

    jax_dtype = {torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16}[dtype]
    _, full = predict(llama(), tmp_path / "x", "jax", dtype, per_device=1)
    _, rounded = predict(llama(jax_dtype), tmp_path / "r", "jax", per_device=1)
    # Ignoring the field would give the float32 weights' logits, which the rounding moves by > 1e-3.
    assert gap(full, rounded) < 1e-5


def jax_train_time_evaluation_keeps_training_precision(tmp_path, dtype):
    """The eval step's dtype: the training precision during train(), the half dtype before and after it."""
    pytest.importorskip("flax")
    from flax import nnx
    from jax_models import RegressionMLP, regression_rows

    seen = []

    class Recorder(xtrainer.TrainerCallback):
        def on_evaluate(self, *args, **kwargs):
            seen.append(trainer.backend._eval_config().compute_dtype)

    rows = regression_rows(16)
    trainer = xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)),
                               args=args(tmp_path, "jax", dtype, per_device=1, max_steps=1, eval_strategy="steps",
                                         eval_steps=1),
                               train_dataset=rows, eval_dataset=rows, callbacks=[Recorder()])
    trainer.evaluate()
    trainer.train()
    trainer.evaluate()
    half = trainer.backend._eval_config().compute_dtype
    assert half is not None and str(np.dtype(half)) == str(dtype).removeprefix("torch.")
    assert seen == [half, None, half]


def torchax_evaluates_in_half_precision(tmp_path, dtype):
    """jax through torchax (XLA lane): the logits of the torch model cast to the half dtype beforehand."""
    pytest.importorskip("torchax")
    _, full = predict(gpt2(), tmp_path / "x", "jax", dtype, per_device=1)
    _, cast = predict(gpt2().to(dtype), tmp_path / "c", "jax", per_device=1)
    _, plain = predict(gpt2(), tmp_path / "p", "jax", per_device=1)
    assert gap(full, cast) < 1e-6
    assert gap(full, plain) > 1e-3
