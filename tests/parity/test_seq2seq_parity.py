"""xtrainer's Seq2SeqTrainer (torch backend) against transformers' Seq2SeqTrainer, predict_with_generate.

Same tiny T5 weights, same data: predictions (generated ids, padded with the pad id to the generation
config's max_length, -100 across batches), label_ids and metrics must be identical, for greedy and
beam search, through args and through evaluate/predict gen kwargs. On the XLA lane the torch_xla
backend's static-shape greedy decoding must produce the same tokens as torch's.
"""

import copy
import importlib.util
import types

import numpy as np
import pytest
import torch
import transformers

import xtrainer

PAD, EOS, START = 3, 1, 0
VOCAB = 24


def tiny_t5(seed: int = 0):
    """A 1-layer T5 whose random weights make varied sequences, some ending early with EOS."""
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=START, pad_token_id=PAD, eos_token_id=EOS, dropout_rate=0.0,
        relative_attention_num_buckets=8, initializer_factor=5.0, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 1.5  # EOS wins for some inputs: sequences of different lengths
    return model


def seq2seq_data(n: int = 10, seed: int = 0) -> list[dict]:
    """Fixed-length inputs with padded tails, labels ending in EOS with -100 tails of different lengths."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ids = rng.integers(4, VOCAB, size=7)
        mask = np.ones(7, dtype=np.int64)
        cut = 7 - (i % 3)
        ids[cut:], mask[cut:] = PAD, 0
        labels = np.full(5, -100, dtype=np.int64)
        length = 2 + i % 4
        labels[: length - 1] = rng.integers(4, VOCAB, size=length - 1)
        labels[length - 1] = EOS
        rows.append({"input_ids": ids.astype(np.int64), "attention_mask": mask, "labels": labels})
    return rows


def exact_match(pred):
    """Sequence exact match and token agreement, ignoring the decoder start, pads and -100."""
    preds, labels = np.asarray(pred.predictions), np.asarray(pred.label_ids)
    hits, tokens = [], 0
    for p, l in zip(preds, labels):
        p = [t for t in p[1:] if t not in (PAD, -100)]
        l = [t for t in l if t not in (PAD, -100)]
        hits.append(p == l)
        tokens += sum(a == b for a, b in zip(p, l))
    return {"exact_match": float(np.mean(hits)), "tokens_matched": tokens, "pred_sum": int(np.where(preds < 0, 0, preds).sum())}


ARGS = dict(per_device_eval_batch_size=4, predict_with_generate=True, report_to="none", disable_tqdm=True)


def _pair(tmp_path, processing_class=None, compute_metrics=exact_match, **overrides):
    model = tiny_t5()
    kwargs = {**ARGS, **overrides}
    hf = transformers.Seq2SeqTrainer(
        model=copy.deepcopy(model), args=transformers.Seq2SeqTrainingArguments(str(tmp_path / "hf"), **kwargs),
        compute_metrics=compute_metrics, processing_class=processing_class,
    )
    xt = xtrainer.Seq2SeqTrainer(
        model=copy.deepcopy(model),
        args=xtrainer.Seq2SeqTrainingArguments(str(tmp_path / "xt"), backend="torch", **kwargs),
        compute_metrics=compute_metrics, processing_class=processing_class,
    )
    return hf, xt


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("seq2seq"))


def _set_args(trainers, **values):
    for trainer in trainers:
        for key, value in values.items():
            setattr(trainer.args, key, value)


def _same_metrics(a: dict, b: dict):
    skip = ("_runtime", "_per_second", "_model_preparation_time")
    keys = {k for k in a if not k.endswith(skip)}
    assert keys == {k for k in b if not k.endswith(skip)}
    for key in keys:
        assert b[key] == pytest.approx(a[key], rel=1e-6), key


def _same_output(hf_out, xt_out):
    assert xt_out.predictions.shape == hf_out.predictions.shape
    np.testing.assert_array_equal(xt_out.predictions, hf_out.predictions)
    np.testing.assert_array_equal(xt_out.label_ids, hf_out.label_ids)
    _same_metrics(hf_out.metrics, xt_out.metrics)


@pytest.mark.parametrize(
    "args, gen_kwargs",
    [
        ({}, {}),  # greedy, transformers' default max_length: sequences longer than the pad target
        ({"generation_max_length": 8}, {}),  # shorter than the default 20: padded with the pad id
        ({"generation_max_length": 8, "generation_num_beams": 2}, {}),  # beam search from the args
        ({"generation_max_length": 30}, {"max_new_tokens": 4, "num_beams": 2}),  # kwargs beat the args
        ({}, {"max_length": 24}),  # past 20: batches keep their own length, -100 between them
    ],
)
def test_predict_matches_transformers(pair, args, gen_kwargs):
    _set_args(pair, **{"generation_max_length": None, "generation_num_beams": None, **args})
    hf, xt = pair
    data = seq2seq_data()
    hf_out = hf.predict(data, **gen_kwargs)
    xt_out = xt.predict(data, **gen_kwargs)
    _same_output(hf_out, xt_out)
    assert xt_out.predictions.shape[0] == len(data)
    assert "test_loss" in xt_out.metrics and "test_exact_match" in xt_out.metrics
    if args.get("generation_max_length") == 8:
        # Generated up to 8 tokens, padded to transformers' default max_length 20 with the model's pad id.
        assert xt_out.predictions.shape == (10, 20) and xt_out.label_ids.shape == (10, 20)
        assert (xt_out.predictions[:, 8:] == PAD).all() and (xt_out.label_ids[:, 5:] == PAD).all()
        assert (xt_out.predictions[:, 0] == START).all()
    if gen_kwargs.get("max_length") == 24:
        assert xt_out.predictions.shape == (10, 24)  # not padded to 20: longer than the pad target


def test_evaluate_gen_kwargs_override(pair):
    _set_args(pair, generation_max_length=10, generation_num_beams=1)
    hf, xt = pair
    data = seq2seq_data(9, seed=1)
    hf.eval_dataset = xt.eval_dataset = data
    _same_metrics(hf.evaluate(max_length=6, num_beams=2), xt.evaluate(max_length=6, num_beams=2))
    _same_metrics(hf.evaluate(), xt.evaluate())
    assert xt.evaluate(max_length=6)["eval_pred_sum"] != xt.evaluate(max_length=10)["eval_pred_sum"]


def test_tokenizer_without_pad_pads_with_eos(tmp_path):
    tokenizer = types.SimpleNamespace(pad_token_id=None, eos_token_id=EOS)
    hf, xt = _pair(tmp_path, processing_class=tokenizer, generation_max_length=6)
    data = seq2seq_data(6)
    hf_out, xt_out = hf.predict(data), xt.predict(data)
    _same_output(hf_out, xt_out)
    assert (xt_out.predictions[:, 6:] == EOS).all()


def test_without_predict_with_generate_returns_logits(tmp_path):
    hf, xt = _pair(tmp_path, compute_metrics=None, predict_with_generate=False)
    data = seq2seq_data(10)
    hf_out, xt_out = hf.predict(data), xt.predict(data)
    assert isinstance(xt_out.predictions, tuple)  # (logits, encoder states), as transformers returns them
    xt_logits, hf_logits = xt_out.predictions[0], hf_out.predictions[0]
    assert xt_logits.shape == (10, 5, VOCAB)
    np.testing.assert_allclose(xt_logits, hf_logits, rtol=1e-5, atol=1e-6)
    # Seq2SeqTrainer weighs the short last batch as a full one (transformers' plain gather).
    assert xt_out.metrics["test_loss"] == pytest.approx(hf_out.metrics["test_loss"], rel=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="torch_xla is only in the XLA lane")
@pytest.mark.parametrize("num_beams", [1, 2])
def test_torch_xla_tokens_equal_torch(tmp_path, num_beams):
    import torch_xla.runtime as xr

    model = tiny_t5()
    data = seq2seq_data()
    devices = xr.global_runtime_device_count()
    kwargs = {**ARGS, "generation_max_length": 9, "generation_num_beams": num_beams}
    torch_trainer = xtrainer.Seq2SeqTrainer(
        model=copy.deepcopy(model), args=xtrainer.Seq2SeqTrainingArguments(str(tmp_path / "t"), backend="torch", **kwargs),
        compute_metrics=exact_match,
    )
    # The same 4-row eval batches on the XLA mesh (the batch is split over its devices).
    xla_kwargs = {**kwargs, "per_device_eval_batch_size": max(1, 4 // devices)}
    xla_trainer = xtrainer.Seq2SeqTrainer(
        model=copy.deepcopy(model),
        args=xtrainer.Seq2SeqTrainingArguments(str(tmp_path / "x"), backend="torch_xla", **xla_kwargs),
        compute_metrics=exact_match,
    )
    expected, got = torch_trainer.predict(data), xla_trainer.predict(data)
    np.testing.assert_array_equal(got.predictions, expected.predictions)
    np.testing.assert_array_equal(got.label_ids, expected.label_ids)
    assert got.metrics["test_pred_sum"] == expected.metrics["test_pred_sum"]
    if 4 % devices == 0:
        assert got.metrics["test_loss"] == pytest.approx(expected.metrics["test_loss"], rel=1e-4)
