"""The evaluation fields of TrainingArguments on every backend: each assertion fails if its field is ignored."""

import numpy as np
import pytest

from field_probes import backend_params, make_trainer, rows

EVAL_ROWS = 3  # per batch device: three batches with per_device_eval_batch_size=1


class Metrics:
    """A compute_metrics that keeps what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, prediction, compute_result=None):
        self.calls.append((prediction, compute_result))
        return {"calls": len(self.calls)}


@pytest.mark.parametrize("backend", backend_params())
def test_evaluation_fields(tmp_path, backend):
    metrics = Metrics()
    trainer = make_trainer(backend, tmp_path, label_names=["target"], compute_metrics=metrics)
    devices = trainer.backend.local_batch_devices
    data = rows(EVAL_ROWS * devices, start=100)
    targets = np.array([r["target"] for r in data])
    args = trainer.args

    # label_names: the labels are the `target` column; eval_do_concat_batches=False keeps a list of batches;
    # include_for_metrics adds the inputs and the per-example losses.
    args.eval_do_concat_batches, args.include_for_metrics = False, ["inputs", "loss"]
    trainer.evaluate(data)
    prediction, _ = metrics.calls[-1]
    assert isinstance(prediction.predictions, list) and len(prediction.predictions) == EVAL_ROWS
    np.testing.assert_allclose(np.concatenate(prediction.label_ids), targets)
    assert prediction.inputs is not None and len(prediction.inputs) == EVAL_ROWS
    assert prediction.losses is not None and len(np.asarray(prediction.losses)) == EVAL_ROWS * devices

    # eval_accumulation_steps=1: results move to the host after every batch, not once at the end.
    args.eval_do_concat_batches, args.include_for_metrics = True, []
    moves = []
    to_host = trainer.backend.to_host
    trainer.backend.to_host = lambda tree: moves.append(1) or to_host(tree)
    trainer.evaluate(data)
    at_end = len(moves)
    args.eval_accumulation_steps = 1
    trainer.evaluate(data)
    assert len(moves) - at_end > at_end
    trainer.backend.to_host = to_host
    args.eval_accumulation_steps = None
    assert np.asarray(metrics.calls[-1][0].predictions).shape == (EVAL_ROWS * devices,)  # concatenated again

    # batch_eval_metrics: compute_metrics per batch, compute_result=True on the last one.
    metrics.calls.clear()
    args.batch_eval_metrics = True
    trainer.evaluate(data)
    assert [flag for _, flag in metrics.calls] == [False, False, True]
    args.batch_eval_metrics = False

    # prediction_loss_only: no predictions, so no compute_metrics.
    metrics.calls.clear()
    args.prediction_loss_only = True
    result = trainer.evaluate(data)
    assert metrics.calls == [] and "eval_calls" not in result and np.isfinite(result["eval_loss"])


def _t5_and_rows(backend):
    import torch
    import transformers

    torch.manual_seed(3)  # a model whose beam search and greedy search pick different tokens
    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                                   decoder_start_token_id=0, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   initializer_factor=5.0)
    hf = transformers.T5ForConditionalGeneration(config).eval()
    rng = np.random.default_rng(0)
    # No labels: predict() then only generates (no teacher-forced loss to compile as well).
    data = [{"input_ids": rng.integers(2, 40, size=6).astype(np.int64), "attention_mask": np.ones(6, np.int64)}
            for _ in range(4)]
    if backend == "jax":
        from xtrainer.models import load_hf_t5

        return hf, load_hf_t5(hf), data
    import copy

    return hf, copy.deepcopy(hf), data


def _until_eos(tokens: np.ndarray) -> list[list[int]]:
    """Each row up to its first end-of-sequence id (1): what follows is padding, which batching decides."""
    out = []
    for row in np.asarray(tokens).tolist():
        out.append(row[: row.index(1) + 1] if 1 in row else row)
    return out


def _hf_tokens(hf, data, **gen):
    import torch

    ids = torch.tensor(np.stack([r["input_ids"] for r in data]))
    mask = torch.tensor(np.stack([r["attention_mask"] for r in data]))
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, **gen).numpy()


@pytest.mark.parametrize("backend", backend_params())
def test_generation_fields(tmp_path, backend):
    import transformers

    import xtrainer

    hf, model, data = _t5_and_rows(backend)
    common = dict(backend=backend, per_device_eval_batch_size=1, report_to="none", disable_tqdm=True,
                  predict_with_generate=True)
    args = xtrainer.Seq2SeqTrainingArguments(str(tmp_path / "a"), generation_max_length=5, generation_num_beams=2,
                                             **common)
    preds = np.asarray(xtrainer.Seq2SeqTrainer(model=model, args=args).predict(data).predictions)
    expected = _hf_tokens(hf, data, max_length=5, num_beams=2)  # generation_max_length, generation_num_beams
    assert not np.array_equal(expected, _hf_tokens(hf, data, max_length=5, num_beams=1))  # beams change the tokens
    assert _until_eos(preds[:, :5]) == _until_eos(expected)
    assert (preds[:, 5:] == 0).all()  # padded (with the pad id) to the model's max_length, as transformers does

    config = transformers.GenerationConfig(max_length=4, num_beams=1, decoder_start_token_id=0)
    args = xtrainer.Seq2SeqTrainingArguments(str(tmp_path / "b"), generation_config=config, **common)
    preds = np.asarray(xtrainer.Seq2SeqTrainer(model=_t5_and_rows(backend)[1], args=args).predict(data).predictions)
    expected = _hf_tokens(hf, data, max_length=4, num_beams=1)  # the settings of generation_config
    assert _until_eos(preds[:, :4]) == _until_eos(expected)
    assert (preds[:, 4:] == 0).all()
