"""Evaluation and prediction of xtrainer.Trainer (torch backend) against transformers' Trainer.

Each test runs the same model copy, data and arguments through both trainers and compares what
compute_metrics / preprocess_logits_for_metrics receive and what evaluate() / predict() return.
"""

import copy
import gc

import numpy as np
import pytest
import torch
import transformers
from torch import nn

import xtrainer
from helpers import RegressionModel, regression_data

# transformers' train() starts with accelerate's free_memory(), a full gc.collect() that costs ~0.8 s with
# torch + transformers loaded; moving the import-time heap to the permanent generation makes it cheap.
_ = (transformers.Trainer, transformers.TrainingArguments, transformers.TrainerCallback)  # resolve lazy imports
gc.freeze()

# transformers' DataLoader asks for pinned memory, which a CPU-only machine cannot give.
pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")

COMMON = dict(per_device_eval_batch_size=3, report_to="none", disable_tqdm=True)
PAD_WIDTH = 8
VOCAB = 11


class TruncatingLM(nn.Module):
    """A token classifier whose logits stop at the longest non-pad row of the batch.

    Its output length therefore changes from batch to batch, which makes the evaluation loop pad
    predictions with -100 before concatenating them.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, 5)
        self.head = nn.Linear(5, VOCAB)

    def forward(self, input_ids, attention_mask, labels=None):
        width = int(attention_mask.sum(1).max())
        logits = self.head(self.emb(input_ids[:, :width]))
        if labels is None:
            return (logits,)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels[:, :width].reshape(-1), ignore_index=-100)
        return (loss, logits)


def pad_collator(features):
    """Pads every row to PAD_WIDTH (torch tensors, as transformers' collators return)."""
    n = len(features)
    ids = torch.zeros(n, PAD_WIDTH, dtype=torch.long)
    mask = torch.zeros(n, PAD_WIDTH, dtype=torch.long)
    labels = torch.full((n, PAD_WIDTH), -100, dtype=torch.long)
    for i, f in enumerate(features):
        row = torch.tensor(f["input_ids"])
        ids[i, : len(row)], mask[i, : len(row)], labels[i, : len(row)] = row, 1, row
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_data(lengths=(2, 3, 2, 2, 5, 4, 7, 1, 3, 6, 2), seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(1, VOCAB, size=n).tolist()} for n in lengths]


def _both(tmp_path, model, **kwargs):
    """(hf_trainer, xt_trainer) built on copies of one model; kwargs go to Trainer, `args` to TrainingArguments."""
    args = {**COMMON, **kwargs.pop("args", {})}
    trainers = []
    for lib, name in ((transformers, "hf"), (xtrainer, "xt")):
        extra = {"backend": "torch"} if lib is xtrainer else {}
        trainers.append(
            lib.Trainer(
                model=copy.deepcopy(model), args=lib.TrainingArguments(str(tmp_path / name), **args, **extra), **kwargs
            )
        )
    return trainers


def _strip_timing(metrics):
    return {
        k: v for k, v in metrics.items()
        if not k.endswith(("_runtime", "_per_second", "_model_preparation_time"))
    }


def _assert_same_metrics(xt_metrics, hf_metrics):
    hf, xt = _strip_timing(hf_metrics), _strip_timing(xt_metrics)
    assert sorted(xt) == sorted(hf)
    for key in hf:
        assert xt[key] == pytest.approx(hf[key], rel=1e-6), key


def _assert_same_arrays(x, h):
    if isinstance(h, (tuple, list)):
        assert type(x) is type(h) and len(x) == len(h)
        for a, b in zip(x, h):
            _assert_same_arrays(a, b)
        return
    assert isinstance(x, np.ndarray) and isinstance(h, np.ndarray)
    assert x.shape == h.shape and x.dtype == h.dtype
    np.testing.assert_allclose(x, h, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# compute_metrics / preprocess_logits_for_metrics
# ---------------------------------------------------------------------------------------------------------------


def test_compute_metrics_receives_eval_prediction(tmp_path):
    seen = {"hf": [], "xt": []}

    def metrics_for(key):
        def compute_metrics(pred):
            seen[key].append(pred)
            preds = pred.predictions[0]  # double_output: a tuple of two prediction arrays
            return {"mae": float(np.abs(preds - pred.label_ids).mean()), "n": len(pred.label_ids)}

        return compute_metrics

    data = regression_data(10)
    model = RegressionModel(a=1.5, b=0.5, double_output=True)
    hf, xt = _both(tmp_path, model, eval_dataset=data)
    hf.compute_metrics, xt.compute_metrics = metrics_for("hf"), metrics_for("xt")
    hm, xm = hf.evaluate(), xt.evaluate()
    _assert_same_metrics(xm, hm)
    assert xm["eval_n"] == 10
    expected_mae = np.mean([abs(1.5 * r["input_x"] + 0.5 - r["labels"]) for r in data])
    assert xm["eval_mae"] == pytest.approx(expected_mae, rel=1e-5)
    (hp,), (xp,) = seen["hf"], seen["xt"]
    assert isinstance(xp, xtrainer.EvalPrediction)
    assert xp.inputs is None and xp.losses is None
    _assert_same_arrays(xp.predictions, hp.predictions)
    _assert_same_arrays(xp.label_ids, hp.label_ids)
    preds, labels = xp  # EvalPrediction unpacks like a tuple
    assert labels is xp.label_ids


def test_preprocess_logits_for_metrics_gets_torch_tensors(tmp_path):
    seen = {"hf": [], "xt": []}

    def preprocess_for(key):
        def preprocess(logits, labels):
            seen[key].append((type(logits), type(labels), tuple(logits.shape), tuple(labels.shape)))
            return logits.argmax(-1)

        return preprocess

    got = {}

    def metrics_for(key):
        def compute_metrics(pred):
            got[key] = pred
            valid = pred.label_ids[:, : pred.predictions.shape[1]] != -100
            return {"acc": float((pred.predictions == pred.label_ids[:, : pred.predictions.shape[1]])[valid].mean())}

        return compute_metrics

    hf, xt = _both(tmp_path, TruncatingLM(), eval_dataset=token_data(), data_collator=pad_collator)
    for t, key in ((hf, "hf"), (xt, "xt")):
        t.preprocess_logits_for_metrics, t.compute_metrics = preprocess_for(key), metrics_for(key)
    hm, xm = hf.evaluate(), xt.evaluate()
    _assert_same_metrics(xm, hm)
    assert seen["xt"] == seen["hf"]
    assert seen["xt"][0] == (torch.Tensor, torch.Tensor, (3, 3, VOCAB), (3, PAD_WIDTH))
    # compute_metrics gets what preprocess returned (argmax ids, -100-padded to the widest batch), as numpy.
    _assert_same_arrays(got["xt"].predictions, got["hf"].predictions)
    assert got["xt"].predictions.dtype == np.int64 and got["xt"].predictions.shape == (11, 7)


def test_batch_eval_metrics_calls_per_batch(tmp_path):
    calls = {"hf": [], "xt": []}

    def metrics_for(key):
        totals = {"correct": 0, "count": 0}

        def compute_metrics(pred, compute_result):
            assert isinstance(pred.predictions, torch.Tensor) and isinstance(pred.label_ids, torch.Tensor)
            assert isinstance(pred.losses, torch.Tensor)
            assert isinstance(pred.inputs, dict) and isinstance(pred.inputs["input_ids"], torch.Tensor)
            calls[key].append((compute_result, tuple(pred.predictions.shape), tuple(pred.losses.shape),
                               sorted(pred.inputs)))
            width = pred.predictions.shape[1]
            labels = pred.label_ids[:, :width]
            hit = (pred.predictions.argmax(-1) == labels) & (labels != -100)
            totals["correct"] += int(hit.sum())
            totals["count"] += int((labels != -100).sum())
            if not compute_result:
                return {}
            result = {"acc": totals["correct"] / totals["count"]}
            totals.update(correct=0, count=0)
            return result

        return compute_metrics

    hf, xt = _both(tmp_path, TruncatingLM(), eval_dataset=token_data(), data_collator=pad_collator,
                   args=dict(batch_eval_metrics=True, include_for_metrics=["inputs", "loss"]))
    hf.compute_metrics, xt.compute_metrics = metrics_for("hf"), metrics_for("xt")
    hm, xm = hf.evaluate(), xt.evaluate()
    _assert_same_metrics(xm, hm)
    assert calls["xt"] == calls["hf"]
    # 11 rows in batches of 3: four calls, the result is asked for on the last one only.
    assert [c[0] for c in calls["xt"]] == [False, False, False, True]
    assert [c[2] for c in calls["xt"]] == [(3,), (3,), (3,), (2,)]  # per-example losses of each batch

    # predict() keeps the predictions even with batch_eval_metrics.
    hp, xp = hf.predict(token_data()), xt.predict(token_data())
    _assert_same_arrays(xp.predictions, hp.predictions)
    _assert_same_metrics(xp.metrics, hp.metrics)


def test_batch_eval_metrics_on_a_stream_reaches_compute_result(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(token_data())

    flags = {"hf": [], "xt": []}

    def metrics_for(key):
        def compute_metrics(pred, compute_result):
            flags[key].append(compute_result)
            return {"last": 1.0} if compute_result else {}

        return compute_metrics

    hf, xt = _both(tmp_path, TruncatingLM(), data_collator=pad_collator, args=dict(batch_eval_metrics=True))
    hf.compute_metrics, xt.compute_metrics = metrics_for("hf"), metrics_for("xt")
    hm, xm = hf.evaluate(Stream()), xt.evaluate(Stream())
    assert flags["xt"] == flags["hf"] == [False, False, False, True]
    assert xm["eval_last"] == hm["eval_last"] == 1.0
    _assert_same_metrics(xm, hm)


# ---------------------------------------------------------------------------------------------------------------
# Loop options
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("accumulation", [None, 1, 2, 3])
def test_eval_accumulation_steps_gives_identical_results(tmp_path, accumulation):
    hf, xt = _both(tmp_path, TruncatingLM(), data_collator=pad_collator,
                   args=dict(eval_accumulation_steps=accumulation))
    hp, xp = hf.predict(token_data()), xt.predict(token_data())
    _assert_same_arrays(xp.predictions, hp.predictions)
    _assert_same_arrays(xp.label_ids, hp.label_ids)
    _assert_same_metrics(xp.metrics, hp.metrics)
    # And independent of the accumulation: the same as without it.
    base = xtrainer.Trainer(model=TruncatingLM(), data_collator=pad_collator,
                            args=xtrainer.TrainingArguments(str(tmp_path / "base"), **COMMON))
    _assert_same_arrays(xp.predictions, base.predict(token_data()).predictions)


def test_predictions_of_different_lengths_are_padded_like_hf(tmp_path):
    hf, xt = _both(tmp_path, TruncatingLM(), data_collator=pad_collator)
    # Batch widths are 3, 5, 7 and 6: logits are padded to 7 with -100 on the sequence axis.
    hp, xp = hf.predict(token_data()), xt.predict(token_data())
    _assert_same_arrays(xp.predictions, hp.predictions)
    _assert_same_arrays(xp.label_ids, hp.label_ids)
    assert xp.predictions.shape == (11, 7, VOCAB) and xp.predictions.dtype == np.float32
    assert (xp.predictions[0:3, 3:] == -100).all() and (xp.predictions[0:3, :3] != -100).all()
    assert (xp.predictions[6:9] != -100).all()
    assert (xp.predictions[9:, 6:] == -100).all()
    assert xp.label_ids.shape == (11, PAD_WIDTH)
    assert xp.metrics["test_loss"] == pytest.approx(hp.metrics["test_loss"], rel=1e-6)


def test_eval_do_concat_batches_false_keeps_batches(tmp_path):
    hf, xt = _both(tmp_path, TruncatingLM(), data_collator=pad_collator, args=dict(eval_do_concat_batches=False))
    hp, xp = hf.predict(token_data()), xt.predict(token_data())
    assert isinstance(xp.predictions, list) and len(xp.predictions) == len(hp.predictions) == 4
    for a, b in zip(xp.predictions, hp.predictions):
        _assert_same_arrays(a, b)
    assert [p.shape[1] for p in xp.predictions] == [3, 5, 7, 6]


def test_custom_label_names(tmp_path):
    class TwoTargets(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor(1.5))

        def forward(self, x, target=None, aux=None):
            y = self.w * x
            if target is None:
                return (y,)
            return (((y - target) ** 2).mean() + ((y - aux) ** 2).mean(), y)

    rng = np.random.default_rng(3)
    data = [{"x": float(v), "target": float(2 * v), "aux": float(v + 1)} for v in rng.normal(size=7)]
    seen = {}

    def metrics_for(key):
        def compute_metrics(pred):
            seen[key] = pred
            return {"err": float(np.abs(pred.predictions - pred.label_ids[0]).mean())}

        return compute_metrics

    hf, xt = _both(tmp_path, TwoTargets(), eval_dataset=data, args=dict(label_names=["target", "aux"]))
    hf.compute_metrics, xt.compute_metrics = metrics_for("hf"), metrics_for("xt")
    hm, xm = hf.evaluate(), xt.evaluate()
    _assert_same_metrics(xm, hm)
    assert isinstance(seen["xt"].label_ids, tuple) and len(seen["xt"].label_ids) == 2
    _assert_same_arrays(seen["xt"].label_ids, seen["hf"].label_ids)
    np.testing.assert_allclose(seen["xt"].label_ids[1], [r["aux"] for r in data], rtol=1e-6)
    # Each example weighs its batch's mean loss: batches of 3, 3 and 1.
    per_row = [(1.5 * r["x"] - r["target"]) ** 2 + (1.5 * r["x"] - r["aux"]) ** 2 for r in data]
    batch_means = [np.mean(per_row[i : i + 3]) for i in range(0, 7, 3)]
    assert xm["eval_loss"] == pytest.approx((3 * batch_means[0] + 3 * batch_means[1] + batch_means[2]) / 7, rel=1e-5)

    # Without the label names no label is recognised: no loss, no label_ids, and the model's whole output
    # (its scalar loss, one per batch, and y) becomes the predictions, as in HF.
    hf, xt = _both(tmp_path / "plain", TwoTargets())
    hp, xp = hf.predict(data), xt.predict(data)
    assert xp.label_ids is None and hp.label_ids is None and "test_loss" not in xp.metrics
    _assert_same_arrays(xp.predictions, hp.predictions)
    assert [p.shape for p in xp.predictions] == [(3,), (7,)]
    _assert_same_arrays(xt.predict(data[:2]).predictions, hf.predict(data[:2]).predictions)  # one batch: a 0-d loss


def test_prediction_loss_only(tmp_path):
    calls = []
    hf, xt = _both(tmp_path, RegressionModel(a=1.0), eval_dataset=regression_data(8),
                   compute_metrics=lambda p: calls.append(p) or {"x": 1.0}, args=dict(prediction_loss_only=True))
    hm, xm = hf.evaluate(), xt.evaluate()
    _assert_same_metrics(xm, hm)
    assert "eval_x" not in xm and calls == []
    hp, xp = hf.predict(regression_data(8)), xt.predict(regression_data(8))
    assert xp.predictions is None and xp.label_ids is None and hp.predictions is None
    assert xp.metrics["test_loss"] == pytest.approx(hp.metrics["test_loss"], rel=1e-6)


def test_include_for_metrics_inputs_and_loss(tmp_path):
    seen = {}

    def metrics_for(key):
        def compute_metrics(pred):
            seen[key] = pred
            return {"mean_loss": float(np.mean(pred.losses))}

        return compute_metrics

    hf, xt = _both(tmp_path, TruncatingLM(), eval_dataset=token_data(), data_collator=pad_collator,
                   args=dict(include_for_metrics=["inputs", "loss"], eval_accumulation_steps=2))
    hf.compute_metrics, xt.compute_metrics = metrics_for("hf"), metrics_for("xt")
    hm, xm = hf.evaluate(), xt.evaluate()
    _assert_same_metrics(xm, hm)
    hp, xp = seen["hf"], seen["xt"]
    _assert_same_arrays(xp.inputs, hp.inputs)
    _assert_same_arrays(xp.losses, hp.losses)
    assert xp.inputs.shape == (11, PAD_WIDTH) and xp.losses.shape == (11,)
    assert len(xp.elements) == 4  # predictions, label_ids, inputs, losses
    assert xm["eval_mean_loss"] == pytest.approx(xm["eval_loss"], rel=1e-6)


def test_dict_of_eval_datasets_prefixes_metrics(tmp_path):
    sets = {"small": regression_data(5, seed=1), "big": regression_data(9, seed=2)}
    hf, xt = _both(tmp_path, RegressionModel(a=1.0, b=1.0), eval_dataset=sets,
                   compute_metrics=lambda p: {"count": len(p.label_ids)})
    hm, xm = hf.evaluate(), xt.evaluate()
    _assert_same_metrics(xm, hm)
    assert xm["eval_small_count"] == 5 and xm["eval_big_count"] == 9
    assert {"eval_small_loss", "eval_big_loss"} <= set(xm)
    # One on_log / log_history entry per dataset, as in HF.
    assert [sorted(_strip_timing(l)) for l in xt.state.log_history] == [
        sorted(_strip_timing(l)) for l in hf.state.log_history
    ]
    # An explicit prefix composes with the dataset names.
    assert "val_small_loss" in xt.evaluate(metric_key_prefix="val")
    # A dataset name evaluates that dataset alone, under the plain prefix (HF's evaluate("name")).
    hs, xs = hf.evaluate("small"), xt.evaluate("small")
    _assert_same_metrics(xs, hs)
    assert xs["eval_loss"] == pytest.approx(xm["eval_small_loss"], rel=1e-6) and xs["eval_count"] == 5


def test_dict_eval_datasets_during_training_and_best_metric(tmp_path):
    sets = {"a": regression_data(5, seed=1), "b": regression_data(6, seed=2)}
    hf, xt = _both(
        tmp_path, RegressionModel(), train_dataset=regression_data(16), eval_dataset=sets,
        args=dict(per_device_train_batch_size=4, learning_rate=0.1, max_steps=4, eval_strategy="steps", eval_steps=2,
                  save_strategy="steps", save_steps=2, metric_for_best_model="eval_b_loss",
                  train_sampling_strategy="sequential", logging_steps=100),
    )
    hf.train()
    xt.train()
    hf_evals = [_strip_timing(l) for l in hf.state.log_history if "eval_a_loss" in l or "eval_b_loss" in l]
    xt_evals = [_strip_timing(l) for l in xt.state.log_history if "eval_a_loss" in l or "eval_b_loss" in l]
    assert len(xt_evals) == len(hf_evals) == 4
    for a, b in zip(xt_evals, hf_evals):
        assert sorted(a) == sorted(b)
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert xt.state.best_metric == pytest.approx(hf.state.best_metric, rel=1e-5)
    assert xt.state.best_global_step == hf.state.best_global_step
