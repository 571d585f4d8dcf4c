"""JaxBackend.generate: Seq2SeqTrainer predictions with the NNX T5, compiled once, and clear errors."""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import jax  # noqa: E402

import xtrainer  # noqa: E402
from jax_models import functional_regressor, regression_rows  # noqa: E402
from xtrainer import FunctionalModel  # noqa: E402
from xtrainer.models import load_hf_t5  # noqa: E402
from xtrainer.models.generation import compiled_search  # noqa: E402

VOCAB = 40


def _t5_pair():
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                                decoder_start_token_id=0, relative_attention_num_buckets=8, dropout_rate=0.0)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    return hf, load_hf_t5(hf)


def _rows(n=8, length=6):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        ids = rng.integers(2, VOCAB, size=length).astype(np.int64)
        mask = np.ones(length, np.int64)
        if i % 3 == 1:  # some right-padded sources
            ids[4:], mask[4:] = 0, 0
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids[::-1].copy()})
    return rows


def _args(tmp_path, **kw):
    return xtrainer.Seq2SeqTrainingArguments(
        str(tmp_path), backend="jax", per_device_eval_batch_size=1, report_to="none", disable_tqdm=True,
        predict_with_generate=True, **kw)


def test_seq2seq_trainer_predicts_hf_generate_tokens_compiled_once(tmp_path):
    hf, model = _t5_pair()
    rows = _rows()
    trainer = xtrainer.Seq2SeqTrainer(model=model, args=_args(tmp_path), eval_dataset=rows)
    assert trainer.backend.name == "jax"
    out = trainer.predict(rows, max_new_tokens=5, num_beams=2)
    ids = torch.tensor(np.stack([r["input_ids"] for r in rows]))
    mask = torch.tensor(np.stack([r["attention_mask"] for r in rows]))
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=2, do_sample=False).numpy()
    preds = np.asarray(out.predictions)
    np.testing.assert_array_equal(preds[:, : ref.shape[1]], ref)
    assert (preds[:, ref.shape[1]:] == 0).all()  # the front pads generated ids with the pad id
    assert np.isfinite(out.metrics["test_loss"])
    # A second prediction with the same shapes and settings reuses the compiled search.
    compiled = compiled_search._cache_size()
    again = trainer.predict(rows, max_new_tokens=5, num_beams=2)
    np.testing.assert_array_equal(np.asarray(again.predictions), preds)
    assert compiled_search._cache_size() == compiled


def test_backend_generate_directly_and_unsupported_kinds(tmp_path):
    _, model = _t5_pair()
    trainer = xtrainer.Seq2SeqTrainer(model=model, args=_args(tmp_path / "t5"), eval_dataset=_rows())
    backend = trainer.backend
    batch = backend.eval_inputs(backend.shard_batch({k: np.stack([r[k] for r in _rows()]) for k in ("input_ids", "attention_mask")}))
    model = backend.eval_model(None)  # the prepared parameters, as before training
    tokens = backend.generate(model, batch, {"max_length": 4})
    assert isinstance(tokens, jax.Array) and tokens.shape[0] == 8 and tokens.shape[1] <= 4
    assert (np.asarray(tokens)[:, 0] == 0).all()
    with pytest.raises(ValueError, match="temperature"):
        backend.generate(model, batch, {"temperature": 0.7})

    init_fn, apply_fn = functional_regressor()
    other = xtrainer.Trainer(model=FunctionalModel(init_fn, apply_fn), args=_args(tmp_path / "fn"),
                             eval_dataset=regression_rows(8))
    fbatch = other.backend.eval_inputs(other.backend.shard_batch({"input_ids": np.zeros((8, 3), np.int32)}))
    with pytest.raises(NotImplementedError, match="functional.*supported: Flax NNX encoder-decoder"):
        other.backend.generate(other.backend.eval_model(None), fbatch, {})
