"""Training features of xtrainer.Trainer (torch backend), compared with transformers' Trainer where both are deterministic.

Covers fractional step intervals, model_init, user optimizers, compute_loss_func, remove_unused_columns, the
accepted dataset kinds and collators, sampling seeds and length grouping, and best-model tracking (early
stopping, load_best_model_at_end, save_strategy="best", save_total_limit).
"""

import copy
import gc
import os

import datasets
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

import xtrainer
from helpers import RegressionModel, regression_data, tiny_gpt2

# transformers' train() starts with accelerate's free_memory(), a full gc.collect() that costs ~0.8 s with
# torch + transformers loaded; moving the import-time heap to the permanent generation makes it cheap.
_ = (transformers.Trainer, transformers.TrainingArguments, transformers.TrainerCallback)  # resolve lazy imports
gc.freeze()

# transformers' DataLoader asks for pinned memory, which a CPU-only machine cannot give.
pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")

COMMON = dict(
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    learning_rate=0.05,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    train_sampling_strategy="sequential",
    seed=7,
)


def _trainer(lib, out, model=None, **kwargs):
    args = {**COMMON, **kwargs.pop("args", {})}
    if lib is xtrainer:
        args["backend"] = "torch"
    return lib.Trainer(model=model, args=lib.TrainingArguments(str(out), **args), **kwargs)


def _both(tmp_path, model=None, train=True, **kwargs):
    """Builds (and by default trains) one transformers and one xtrainer Trainer on copies of one model."""
    trainers = []
    for lib, name in ((transformers, "hf"), (xtrainer, "xt")):
        trainer = _trainer(lib, tmp_path / name, copy.deepcopy(model) if model is not None else None, **kwargs)
        if train:
            trainer.train()
        trainers.append(trainer)
    return trainers


def _logs(trainer, key):
    return [(l["step"], l[key]) for l in trainer.state.log_history if key in l]


def _assert_same_losses(hf, xt, rel=1e-6):
    hl, xl = _logs(hf, "loss"), _logs(xt, "loss")
    assert len(xl) == len(hl) > 0
    for (hs, hv), (xs, xv) in zip(hl, xl):
        assert xs == hs
        assert xv == pytest.approx(hv, rel=rel, abs=1e-7)


def _checkpoints(path):
    return sorted((p for p in os.listdir(path) if p.startswith("checkpoint-")), key=lambda p: int(p.split("-")[1]))


def _assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6, msg=k)


# ---------------------------------------------------------------------------------------------------------------
# Step intervals
# ---------------------------------------------------------------------------------------------------------------


def test_fractional_logging_eval_save_steps(tmp_path):
    hf, xt = _both(
        tmp_path, RegressionModel(), train_dataset=regression_data(40), eval_dataset=regression_data(4, seed=1),
        args=dict(max_steps=10, logging_steps=0.2, eval_strategy="steps", eval_steps=0.3, save_strategy="steps",
                  save_steps=0.25),
    )
    # 0.2 * 10 -> every 2 steps; 0.3 * 10 -> 3; ceil(0.25 * 10) -> 3; eval and save also at the last step.
    assert (xt.state.logging_steps, xt.state.eval_steps, xt.state.save_steps) == (2, 3, 3)
    assert (hf.state.logging_steps, hf.state.eval_steps, hf.state.save_steps) == (2, 3, 3)
    assert [s for s, _ in _logs(xt, "loss")] == [s for s, _ in _logs(hf, "loss")] == [2, 4, 6, 8, 10]
    assert [s for s, _ in _logs(xt, "eval_loss")] == [s for s, _ in _logs(hf, "eval_loss")] == [3, 6, 9, 10]
    assert _checkpoints(tmp_path / "xt") == _checkpoints(tmp_path / "hf") == [
        "checkpoint-3", "checkpoint-6", "checkpoint-9", "checkpoint-10"
    ]
    _assert_same_losses(hf, xt)
    for (_, a), (_, b) in zip(_logs(xt, "eval_loss"), _logs(hf, "eval_loss")):
        assert a == pytest.approx(b, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# model_init, optimizers, compute_loss_func
# ---------------------------------------------------------------------------------------------------------------


class RandomInitRegression(RegressionModel):
    def __init__(self):
        super().__init__()
        with torch.no_grad():  # random start, so the seed set before model_init matters
            self.a.copy_(torch.randn(()))
            self.b.copy_(torch.randn(()))


def test_model_init_recreates_the_model_on_train(tmp_path):
    built = {"hf": [], "xt": []}

    def init_for(key):
        def model_init(trial):
            assert trial is None
            model = RandomInitRegression()
            built[key].append(model)
            return model

        return model_init

    trainers = []
    for lib, key in ((transformers, "hf"), (xtrainer, "xt")):
        trainer = _trainer(lib, tmp_path / key, model_init=init_for(key), train_dataset=regression_data(16),
                           args=dict(max_steps=3))
        first = trainer.model
        assert first is built[key][0]
        trainer.train()
        assert len(built[key]) == 2  # once in __init__, once more in train()
        assert trainer.model is built[key][1] and trainer.model is not first
        trainers.append(trainer)
    hf, xt = trainers
    # model_init runs right after seeding with args.seed (in __init__ and again in train()): the same start in
    # both trainers; the model built in __init__ is never trained.
    assert built["xt"][0].a.item() == built["hf"][0].a.item() == _initial_a(7)
    assert built["xt"][0].b.item() == built["hf"][0].b.item()
    _assert_same_losses(hf, xt)
    _assert_same_weights(hf.model, xt.model)
    assert xt.model.a.item() != _initial_a(7)


def test_model_init_forms_and_misuse(tmp_path):
    class Factory:
        def build(self):  # a bound method without arguments
            return RandomInitRegression()

        def __call__(self, trial):  # a callable object taking the trial
            return RandomInitRegression()

    for init in (Factory().build, Factory()):
        trainer = _trainer(xtrainer, tmp_path / "f", model_init=init, train_dataset=regression_data(8),
                           args=dict(max_steps=1))
        trainer.train()
        assert trainer.state.global_step == 1
    # As in transformers: not both a model and a model_init, and no optimizers with a model_init.
    for lib in (transformers, xtrainer):
        with pytest.raises(ValueError, match="model_init"):
            _trainer(lib, tmp_path / "b", RegressionModel(), model_init=RandomInitRegression)
        model = RegressionModel()
        with pytest.raises(RuntimeError, match="model_init.*optimizers"):
            _trainer(lib, tmp_path / "o", model_init=RandomInitRegression,
                     optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))


def _initial_a(seed):
    transformers.set_seed(seed)
    return RandomInitRegression().a.item()


def test_user_optimizer_and_scheduler_are_used(tmp_path):
    def make(lib_model):
        opt = torch.optim.SGD(lib_model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
        return opt, sched

    trainers = []
    for lib, key in ((transformers, "hf"), (xtrainer, "xt")):
        model = RegressionModel()
        opt, sched = make(model)
        trainer = _trainer(lib, tmp_path / key, model, train_dataset=regression_data(24), optimizers=(opt, sched),
                           args=dict(max_steps=5, learning_rate=123.0))  # learning_rate is ignored
        trainer.train()
        # (transformers wraps them in accelerate's AcceleratedOptimizer / AcceleratedScheduler.)
        assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt
        assert getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler) is sched
        assert sched.last_epoch == 5
        trainers.append(trainer)
    hf, xt = trainers
    expected = [0.1 / (s + 1) for s in range(5)]  # the lr each step used
    assert [lr for _, lr in _logs(xt, "learning_rate")] == pytest.approx(expected, rel=1e-9)
    assert _logs(xt, "learning_rate") == _logs(hf, "learning_rate")
    _assert_same_losses(hf, xt)
    _assert_same_weights(hf.model, xt.model)


@pytest.mark.parametrize("ga", [1, 2])
def test_compute_loss_func(tmp_path, ga):
    calls = {"hf": [], "xt": []}

    def loss_for(key):
        def compute_loss(outputs, labels, num_items_in_batch=None):
            calls[key].append((type(outputs).__name__, len(outputs), tuple(labels.shape), float(num_items_in_batch)))
            # A sum over the whole accumulation window divided by its item count: the GA-correct mean.
            return ((outputs[0] - labels) ** 2).sum() / num_items_in_batch

        return compute_loss

    trainers = []
    for lib, key in ((transformers, "hf"), (xtrainer, "xt")):
        trainer = _trainer(lib, tmp_path / key, RegressionModel(), train_dataset=regression_data(22),
                           compute_loss_func=loss_for(key), args=dict(max_steps=4, gradient_accumulation_steps=ga))
        trainer.train()
        trainers.append(trainer)
    hf, xt = trainers
    assert calls["xt"] == calls["hf"]
    # labels are popped before forward, so the model returns (y,) only; num_items counts the window's labels.
    assert calls["xt"][0] == ("tuple", 1, (4,), 4.0 * ga)
    assert len(calls["xt"]) == 4 * ga
    _assert_same_losses(hf, xt)
    # Evaluation computes its loss with compute_loss_func too (num_items = the batch's label count).
    calls["hf"].clear(), calls["xt"].clear()
    he, xe = hf.evaluate(regression_data(6, seed=4)), xt.evaluate(regression_data(6, seed=4))
    assert calls["xt"] == calls["hf"] == [("tuple", 1, (4,), 4.0), ("tuple", 1, (2,), 2.0)]
    assert xe["eval_loss"] == pytest.approx(he["eval_loss"], rel=1e-6)
    _assert_same_weights(hf.model, xt.model)
    # The custom loss drives training: it differs from the model's own MSE loss run.
    plain = _trainer(xtrainer, tmp_path / "plain", RegressionModel(), train_dataset=regression_data(22),
                     args=dict(max_steps=4, gradient_accumulation_steps=ga, learning_rate=0.05))
    plain.train()
    if ga == 1:  # with one micro-batch the sum/num_items loss equals the MSE exactly
        _assert_same_losses(plain, xt)
    else:
        assert _logs(plain, "loss")[1][1] != pytest.approx(_logs(xt, "loss")[1][1], rel=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# remove_unused_columns
# ---------------------------------------------------------------------------------------------------------------


class StrictRegression(nn.Module):
    """forward() without **kwargs: an unexpected column is a TypeError."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.0))
        self.b = nn.Parameter(torch.tensor(0.0))

    def forward(self, input_x, labels=None):
        y = input_x * self.a + self.b
        return (y,) if labels is None else (nn.functional.mse_loss(y, labels), y)


class KwargsRegression(StrictRegression):
    def __init__(self):
        super().__init__()
        self.seen_kwargs = set()

    def forward(self, input_x, labels=None, **kwargs):
        self.seen_kwargs.update(kwargs)
        return super().forward(input_x, labels)


def _with_extra_columns(n=20):
    return [{**row, "extra": float(i), "row_id": i, "note": f"row {i}"} for i, row in enumerate(regression_data(n))]


@pytest.mark.parametrize("kind", ["list", "datasets", "datasets_iterable"])
def test_remove_unused_columns(tmp_path, kind):
    rows = _with_extra_columns()
    data = rows if kind == "list" else datasets.Dataset.from_list(rows)
    if kind == "datasets_iterable":
        data = data.to_iterable_dataset()
    hf, xt = _both(tmp_path, StrictRegression(), train_dataset=data, eval_dataset=data, args=dict(max_steps=5))
    _assert_same_losses(hf, xt)
    assert xt.evaluate()["eval_loss"] == pytest.approx(hf.evaluate()["eval_loss"], rel=1e-6)
    if kind != "list":
        assert data.column_names == ["input_x", "labels", "extra", "row_id", "note"]  # the user's dataset is untouched

    # remove_unused_columns=False passes the extra numeric columns to forward (strings are dropped by the collator).
    kw = _trainer(xtrainer, tmp_path / "kw", KwargsRegression(), train_dataset=data,
                  args=dict(max_steps=2, remove_unused_columns=False))
    kw.train()
    assert kw.model.seen_kwargs == {"extra", "row_id", "num_items_in_batch"}
    hf_kw = _trainer(transformers, tmp_path / "hkw", KwargsRegression(), train_dataset=data,
                     args=dict(max_steps=2, remove_unused_columns=False))
    hf_kw.train()
    assert hf_kw.model.seen_kwargs == kw.model.seen_kwargs
    strict = _trainer(xtrainer, tmp_path / "strict", StrictRegression(), train_dataset=data,
                      args=dict(max_steps=2, remove_unused_columns=False))
    with pytest.raises(TypeError, match="extra|row_id"):
        strict.train()


# ---------------------------------------------------------------------------------------------------------------
# Dataset kinds and collators
# ---------------------------------------------------------------------------------------------------------------


class TorchMapDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class TorchStream(torch.utils.data.IterableDataset):
    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


DATASET_KINDS = {
    "list": lambda rows: rows,
    "datasets": lambda rows: datasets.Dataset.from_list(rows),
    "datasets_torch_format": lambda rows: datasets.Dataset.from_list(rows).with_format("torch"),
    "datasets_iterable": lambda rows: datasets.Dataset.from_list(rows).to_iterable_dataset(),
    "torch_map": TorchMapDataset,
    "torch_iterable": TorchStream,
}


@pytest.mark.parametrize("kind", list(DATASET_KINDS))
def test_dataset_kinds_train_like_hf(tmp_path, kind):
    rows = regression_data(20)
    streaming = "iterable" in kind
    # Streams need max_steps; 7 steps over 5 batches per pass restart the stream once.
    args = dict(max_steps=7) if streaming else dict(num_train_epochs=2)
    hf, xt = _both(tmp_path, RegressionModel(), train_dataset=DATASET_KINDS[kind](rows), args=args)
    _assert_same_losses(hf, xt)
    _assert_same_weights(hf.model, xt.model)
    assert xt.state.global_step == hf.state.global_step == (7 if streaming else 10)
    assert [l["epoch"] for l in xt.state.log_history] == pytest.approx([l["epoch"] for l in hf.state.log_history])
    if not streaming:  # the model saw every example: a fit close to y = 2x + 3
        assert xt.state.log_history[-2]["loss"] < xt.state.log_history[0]["loss"]


def _word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(40)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def test_transformers_lm_collator_with_tokenizer(tmp_path):
    tok = _word_tokenizer()
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{j}" for j in rng.integers(0, 40, size=n)) for n in rng.integers(3, 9, size=12)]
    # A datasets.Dataset with the raw text still in it: remove_unused_columns drops it.
    ds = datasets.Dataset.from_dict({"text": texts}).map(lambda b: tok(b["text"]), batched=True)
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    hf, xt = _both(tmp_path, tiny_gpt2(), train_dataset=ds, data_collator=collator, processing_class=tok,
                   args=dict(max_steps=3, learning_rate=1e-3))
    _assert_same_losses(hf, xt)
    _assert_same_weights(hf.model, xt.model)
    assert all(np.isfinite(v) and v > 0 for _, v in _logs(xt, "loss"))


def test_default_collator_with_a_tokenizer_pads(tmp_path):
    # With a processing_class and no data_collator, both trainers pad with DataCollatorWithPadding.
    tok = _word_tokenizer()
    rng = np.random.default_rng(1)
    rows = []
    for n in rng.integers(3, 9, size=8):
        enc = tok(" ".join(f"w{j}" for j in rng.integers(0, 40, size=n)))
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": int(n % 2)})

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.EmbeddingBag(42, 2, mode="sum")

        def forward(self, input_ids, attention_mask, labels=None):
            logits = self.emb(input_ids, per_sample_weights=attention_mask.float())
            return (nn.functional.cross_entropy(logits, labels), logits) if labels is not None else (logits,)

    hf, xt = _both(tmp_path, Classifier(), train_dataset=rows, processing_class=tok, args=dict(max_steps=2))
    _assert_same_losses(hf, xt)
    _assert_same_weights(hf.model, xt.model)


# ---------------------------------------------------------------------------------------------------------------
# Sampling order
# ---------------------------------------------------------------------------------------------------------------


class OrderRecorder(nn.Module):
    """Records the ids of the examples of every training batch."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.0))
        self.batches = []

    def forward(self, idx, labels=None, input_ids=None):
        if self.training:
            self.batches.append(idx.tolist())
        y = self.w * idx.float()
        return (((y - labels) ** 2).mean(), y) if labels is not None else (y,)


def _order(tmp_path, name, n=24, epochs=2, rows=None, data_collator=None, lib=xtrainer, **args):
    rows = rows or [{"idx": i, "labels": 0.0} for i in range(n)]
    trainer = _trainer(lib, tmp_path / name, OrderRecorder(), train_dataset=rows, data_collator=data_collator,
                       args=dict(num_train_epochs=epochs, logging_steps=100, learning_rate=0.0, **args))
    trainer.train()
    return trainer.model.batches


def test_seed_and_data_seed_make_sampling_reproducible(tmp_path):
    base = _order(tmp_path, "a", train_sampling_strategy="random", seed=1)
    flat = [i for b in base for i in b]
    per_epoch = len(flat) // 2
    assert sorted(flat[:per_epoch]) == sorted(flat[per_epoch:]) == list(range(24))  # each epoch a permutation
    assert flat[:per_epoch] != list(range(24)) and flat[:per_epoch] != flat[per_epoch:]  # shuffled, anew each epoch
    assert _order(tmp_path, "b", train_sampling_strategy="random", seed=1) == base  # same seed, same order
    assert _order(tmp_path, "c", train_sampling_strategy="random", seed=2) != base
    with_data_seed = _order(tmp_path, "d", train_sampling_strategy="random", seed=1, data_seed=5)
    assert with_data_seed != base
    # data_seed alone decides the order: another model seed does not change it, another data_seed does.
    assert _order(tmp_path, "e", train_sampling_strategy="random", seed=3, data_seed=5) == with_data_seed
    assert _order(tmp_path, "f", train_sampling_strategy="random", seed=1, data_seed=6) != with_data_seed
    assert _order(tmp_path, "g", train_sampling_strategy="sequential", seed=1, epochs=1) == [
        list(range(i, i + 4)) for i in range(0, 24, 4)
    ]


def test_group_by_length_groups_similar_lengths(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.permutation(np.repeat(np.arange(2, 14), 4))  # 48 examples, 12 lengths x 4
    rows = [{"idx": i, "input_ids": list(range(int(n))), "labels": 0.0} for i, n in enumerate(lengths)]

    def collate(features):  # pads input_ids; idx identifies the example
        width = max(len(f["input_ids"]) for f in features)
        return {
            "idx": torch.tensor([f["idx"] for f in features]),
            "input_ids": torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features]),
            "labels": torch.tensor([f["labels"] for f in features]),
        }

    def batch_lengths(batches):
        return [sorted(int(lengths[i]) for i in b) for b in batches]

    def spread(batches):
        return sum(b[-1] - b[0] for b in batch_lengths(batches))

    batches = _order(tmp_path, "g", rows=rows, data_collator=collate, train_sampling_strategy="group_by_length",
                     seed=3)
    assert len(batches) == 24
    for epoch in (batches[:12], batches[12:]):
        assert sorted(i for b in epoch for i in b) == list(range(48))
        # Every batch holds (nearly) one length; a random order mixes them.
        assert all(b[-1] - b[0] <= 1 for b in batch_lengths(epoch))
    random = _order(tmp_path, "r", rows=rows, data_collator=collate, epochs=1, train_sampling_strategy="random")
    assert spread(batches[:12]) <= 12 < spread(random)
    # Reproducible for one data seed.
    assert _order(tmp_path, "g2", rows=rows, data_collator=collate, train_sampling_strategy="group_by_length",
                  seed=3) == batches
    # At least as tight as transformers' LengthGroupedSampler on the same data.
    hf = _order(tmp_path, "hg", rows=rows, data_collator=collate, lib=transformers,
                train_sampling_strategy="group_by_length", seed=3)
    assert spread(batches) <= spread(hf) < spread(random) * 2


# ---------------------------------------------------------------------------------------------------------------
# Best model tracking
# ---------------------------------------------------------------------------------------------------------------


def _scripted_metric(values):
    """compute_metrics returning the next scripted `score` on every evaluation."""
    calls = iter(values)

    def compute_metrics(pred):
        return {"score": next(calls)}

    return compute_metrics


SCORES = [3.0, 1.0, 2.0, 0.5, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]  # lower is better; best at the 4th evaluation


def _best_run(tmp_path, callbacks=None, **args):
    """Trains both trainers with a scripted eval `score` per evaluation (eval every step)."""
    out = []
    for lib, key in ((transformers, "hf"), (xtrainer, "xt")):
        trainer = _trainer(
            lib, tmp_path / key, RegressionModel(), train_dataset=regression_data(40),
            eval_dataset=regression_data(4, seed=1), compute_metrics=_scripted_metric(SCORES),
            callbacks=callbacks(lib) if callbacks else None,
            args=dict(eval_strategy="steps", eval_steps=1, metric_for_best_model="score", greater_is_better=False,
                      learning_rate=0.1, **args),
        )
        trainer.train()
        out.append(trainer)
    return out


def test_early_stopping_stops_training(tmp_path):
    hf, xt = _best_run(tmp_path, callbacks=lambda lib: [lib.EarlyStoppingCallback(early_stopping_patience=2)],
                       max_steps=10, save_strategy="steps", save_steps=1, load_best_model_at_end=True)
    # Scores 3, 1, 2, 0.5 (best), 4, 5: two evaluations without improvement after step 4 -> stop at step 6.
    assert xt.state.global_step == hf.state.global_step == 6
    assert xt.state.best_metric == hf.state.best_metric == 0.5
    assert xt.state.best_global_step == hf.state.best_global_step == 4
    assert os.path.basename(xt.state.best_model_checkpoint) == "checkpoint-4"
    cb = next(c for c in xt.callback_handler.callbacks if isinstance(c, xtrainer.EarlyStoppingCallback))
    assert cb.early_stopping_patience_counter == 2


def test_early_stopping_threshold(tmp_path):
    # With a threshold of 0.6, the drop from 1.0 to 0.5 does not count as an improvement.
    cbs = lambda lib: [lib.EarlyStoppingCallback(early_stopping_patience=3, early_stopping_threshold=0.6)]
    hf, xt = _best_run(tmp_path, callbacks=cbs, max_steps=10, save_strategy="no")
    assert xt.state.global_step == hf.state.global_step == 5


def test_load_best_model_at_end_restores_best_weights(tmp_path):
    hf, xt = _best_run(tmp_path, max_steps=6, save_strategy="steps", save_steps=1, load_best_model_at_end=True)
    best = tmp_path / "xt" / "checkpoint-4"
    assert xt.state.best_model_checkpoint == str(best)
    saved = load_file(str(best / "model.safetensors"))
    last = load_file(str(tmp_path / "xt" / "checkpoint-6" / "model.safetensors"))
    assert not torch.equal(saved["a"], last["a"])  # training went on after the best step
    for name, value in xt.model.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
    _assert_same_weights(hf.model, xt.model)
    # Reloading the best weights leaves the logged training history as it was.
    _assert_same_losses(hf, xt)


def test_save_strategy_best_saves_only_on_improvement(tmp_path):
    hf, xt = _best_run(tmp_path, max_steps=6, save_strategy="best")
    # Scores 3, 1, 2, 0.5, 4, 5: new bests at steps 1, 2 and 4.
    assert _checkpoints(tmp_path / "xt") == _checkpoints(tmp_path / "hf") == [
        "checkpoint-1", "checkpoint-2", "checkpoint-4"
    ]
    assert os.path.basename(xt.state.best_model_checkpoint) == os.path.basename(hf.state.best_model_checkpoint)


@pytest.mark.parametrize("limit", [1, 2])
def test_save_total_limit_keeps_the_best_checkpoint(tmp_path, limit):
    hf, xt = _best_run(tmp_path, max_steps=7, save_strategy="steps", save_steps=1, save_total_limit=limit,
                       load_best_model_at_end=True)
    kept = _checkpoints(tmp_path / "xt")
    assert kept == _checkpoints(tmp_path / "hf")
    assert "checkpoint-4" in kept  # the best survives rotation
    assert kept == (["checkpoint-4"] if limit == 1 else ["checkpoint-4", "checkpoint-7"])
    _assert_same_weights(hf.model, xt.model)
