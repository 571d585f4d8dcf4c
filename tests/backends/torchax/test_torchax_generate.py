"""Generation for torch modules trained on the JAX backend through torchax (XLA lane).

The backend hands the current weights back to the torch module and runs transformers' generate.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("torchax")
transformers = pytest.importorskip("transformers")
import jax  # noqa: E402

import xtrainer  # noqa: E402

VOCAB = 48


def _t5():
    config = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config)


def _rows(n=8, seq=6):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        ids = rng.integers(2, VOCAB, size=seq)
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * seq, "labels": ids[::-1].tolist()})
    return rows


def _args(tmp_path, **kw):
    return xtrainer.Seq2SeqTrainingArguments(
        str(tmp_path), backend="jax", per_device_train_batch_size=1, per_device_eval_batch_size=1, report_to="none",
        disable_tqdm=True, save_strategy="no", predict_with_generate=True, **kw)


def test_generate_hands_current_weights_back_to_the_torch_module(tmp_path):
    model = _t5()
    trainer = xtrainer.Seq2SeqTrainer(model=model, args=_args(tmp_path), eval_dataset=_rows())
    backend = trainer.backend
    host = {k: np.array([r[k] for r in _rows()]) for k in ("input_ids", "attention_mask")}
    batch = backend.eval_inputs(backend.shard_batch(host))
    # A state whose weights differ from the module's: generate must use these, not the module's own.
    changed = jax.tree.map(lambda p: p * 1.5, backend.params)
    tokens = backend.generate(backend.eval_model({"params": changed, "extra": backend.extra}), batch, {"max_new_tokens": 5})
    assert isinstance(tokens, jax.Array) and int(tokens[0, 0]) == 0
    for name, value in changed.items():
        np.testing.assert_allclose(model.get_parameter(name).detach().numpy(), np.asarray(value), rtol=1e-6)
    with torch.no_grad():
        ref = model.eval().generate(input_ids=torch.tensor(host["input_ids"]),
                                    attention_mask=torch.tensor(host["attention_mask"]), max_new_tokens=5)
    np.testing.assert_array_equal(np.asarray(tokens), ref.numpy())


def test_seq2seq_trainer_predicts_after_training_on_torchax(tmp_path):
    model = _t5()
    rows = _rows(16)
    trainer = xtrainer.Seq2SeqTrainer(model=model, args=_args(tmp_path, max_steps=3, learning_rate=1e-2),
                                      train_dataset=rows, eval_dataset=rows[:8])
    trainer.train()
    out = trainer.predict(rows[:8], max_new_tokens=4)
    ids = torch.tensor([r["input_ids"] for r in rows[:8]])
    with torch.no_grad():
        ref = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4).numpy()
    preds = np.asarray(out.predictions)
    np.testing.assert_array_equal(preds[:, : ref.shape[1]], ref)
