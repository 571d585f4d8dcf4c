"""TrainingArguments fields that act through the shared loop, checked on every backend.

Each test sets a group of fields and asserts what they change (step counts, logged learning rates,
checkpoint folders, evaluation entries, data order, ...), so a backend on which one of them were ignored
fails. xtrainer/args_support.py names these tests as the proof for the fields marked "acts".
Backends: torch and jax in the main lane, torch_xla in the XLA lane.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import signal

import numpy as np
import pytest
import torch

import xtrainer
from helpers import RegressionModel

KINDS = ["torch", "jax", "torch_xla"]


def _needs(kind: str) -> None:
    if kind == "jax" and importlib.util.find_spec("flax") is None:
        pytest.skip("flax is not installed")
    if kind == "torch_xla" and importlib.util.find_spec("torch_xla") is None:
        pytest.skip("torch_xla runs in the XLA lane")


def _rows(n: int = 40, seed: int = 0) -> list[dict]:
    """Regression rows for both model kinds (x: 4 features, input_x: their sum) with a 3-token input_ids
    column the models ignore (for the token counters) and a length column (for group_by_length)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return [{"x": x[i], "input_x": float(x[i].sum()), "labels": float(x[i] @ [1.0, -2.0, 3.0, 0.5]),
             "input_ids": [i, i + 1, i + 2], "length": int(i % 7), "row": i} for i in range(n)]


def _model(kind: str):
    if kind == "jax":
        from flax import nnx

        from jax_models import RegressionMLP

        return RegressionMLP(nnx.Rngs(0))
    return RegressionModel(a=0.5, b=-0.5)


def _args(tmp_path, kind: str, **kw) -> xtrainer.TrainingArguments:
    base = dict(backend=kind, per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=0.05,
                max_steps=4, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                train_sampling_strategy="sequential", seed=0, remove_unused_columns=False)
    if kind in ("jax", "torch_xla"):  # one example per device: global batches of 8 (jax) and 4 (torch_xla)
        base["per_device_train_batch_size"] = base["per_device_eval_batch_size"] = 1
    cls = xtrainer.Seq2SeqTrainingArguments if kw.pop("_seq2seq", False) else xtrainer.TrainingArguments
    base.update(kw)
    return cls(str(tmp_path), **base)


def _trainer(tmp_path, kind, trainer_cls=xtrainer.Trainer, n=40, data=None, **kw):
    _needs(kind)
    rows = data if data is not None else _rows(n)
    trainer_kw = {k: kw.pop(k) for k in ("compute_metrics", "callbacks", "eval_dataset") if k in kw}
    return trainer_cls(model=_model(kind), args=_args(tmp_path, kind, **kw), train_dataset=rows, **trainer_kw)


def _metrics(prediction):
    predictions = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"mse": float(np.mean((np.asarray(predictions).reshape(-1) - np.asarray(prediction.label_ids).reshape(-1)) ** 2))}


def _logged(trainer, key):
    return [(log["step"], log[key]) for log in trainer.state.log_history if key in log]


def _global_batch(trainer) -> int:
    return trainer.args.per_device_train_batch_size * trainer.backend.local_batch_devices * trainer.backend.num_processes


# ---------------------------------------------------------------- duration and batching


@pytest.mark.parametrize("kind", KINDS)
def test_run_length_and_batching(tmp_path, kind):
    trainer = _trainer(tmp_path / "epochs", kind, max_steps=-1, num_train_epochs=2, gradient_accumulation_steps=2)
    trainer.train()
    batches = -(-40 // _global_batch(trainer))  # the short last batch is kept
    assert trainer.state.global_step == 2 * -(-batches // 2) and trainer.state.epoch == pytest.approx(2.0)
    dropped = _trainer(tmp_path / "drop", kind, max_steps=-1, num_train_epochs=1, dataloader_drop_last=True)
    dropped.train()
    assert dropped.state.global_step == 40 // _global_batch(dropped)
    capped = _trainer(tmp_path / "cap", kind, max_steps=3, num_train_epochs=5)
    capped.train()
    assert capped.state.global_step == 3
    bigger = _trainer(tmp_path / "big", kind, max_steps=-1, num_train_epochs=1,
                      per_device_train_batch_size=2 * capped.args.per_device_train_batch_size)
    bigger.train()
    assert bigger.state.global_step == -(-40 // (2 * _global_batch(capped)))


# ---------------------------------------------------------------- optimizer and schedule


@pytest.mark.parametrize("kind", KINDS)
def test_learning_rate_schedule(tmp_path, kind):
    from transformers import get_scheduler

    trainer = _trainer(tmp_path, kind, max_steps=6, learning_rate=0.1, warmup_steps=2,
                       lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 0.02})
    trainer.train()
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = get_scheduler("cosine_with_min_lr", reference, num_warmup_steps=2, num_training_steps=6,
                             scheduler_specific_kwargs={"min_lr": 0.02})
    expected = []
    for _ in range(6):
        expected.append(schedule.get_last_lr()[0])
        reference.step()
        schedule.step()
    np.testing.assert_allclose([lr for _, lr in _logged(trainer, "learning_rate")], expected, rtol=1e-6)


def _final_weights(trainer) -> np.ndarray:
    model = trainer.model
    if isinstance(model, torch.nn.Module):
        return np.concatenate([p.detach().reshape(-1).numpy() for p in model.parameters()])
    import jax
    from flax import nnx

    return np.concatenate([np.asarray(x).reshape(-1) for x in jax.tree.leaves(nnx.state(model, nnx.Param))])


@pytest.mark.parametrize("kind", KINDS)
def test_optimizer_fields(tmp_path, kind):
    def run(name, **kw):
        trainer = _trainer(tmp_path / name, kind, max_steps=3, **kw)
        trainer.train()
        return _final_weights(trainer)

    base = run("base")
    changed = {
        "optim": run("sgd", optim="sgd"),
        "optim_args": run("momentum", optim="sgd", optim_args="momentum=0.9"),
        "weight_decay": run("wd", weight_decay=0.9),
        "adam_beta1": run("b1", adam_beta1=0.1),
        "adam_beta2": run("b2", adam_beta2=0.5),
        "adam_epsilon": run("eps", adam_epsilon=0.5),
        "max_grad_norm": run("clip", optim="sgd", max_grad_norm=1e-3),
    }
    sgd = changed["optim"]
    for field, weights in changed.items():
        reference = sgd if field in ("optim_args", "max_grad_norm") else base
        assert not np.allclose(weights, reference, rtol=0, atol=1e-7), f"{field} had no effect on {kind}"


# ---------------------------------------------------------------- logging


@pytest.mark.parametrize("kind", KINDS)
def test_logging(tmp_path, kind):
    trainer = _trainer(tmp_path / "steps", kind, max_steps=6, logging_steps=2, logging_first_step=True,
                       include_num_input_tokens_seen="all")
    trainer.train()
    assert [step for step, _ in _logged(trainer, "loss")] == [1, 2, 4, 6]
    tokens = _logged(trainer, "num_input_tokens_seen")
    assert tokens[0] == (1, 3 * _global_batch(trainer))  # 3 input_ids per row
    by_epoch = _trainer(tmp_path / "epoch", kind, max_steps=-1, num_train_epochs=2, logging_strategy="epoch")
    by_epoch.train()
    per_epoch = by_epoch.state.global_step // 2
    assert [step for step, _ in _logged(by_epoch, "loss")] == [per_epoch, 2 * per_epoch]
    assert not _logged(by_epoch, "num_input_tokens_seen")  # include_num_input_tokens_seen defaults to "no"


@pytest.mark.parametrize("kind", KINDS)
def test_logging_nan_inf_filter(tmp_path, kind):
    rows = _rows(40)
    for row in rows[4:8]:  # the second global batch of torch, and part of the first of jax: a NaN loss
        row["labels"] = float("nan")
    filtered = _trainer(tmp_path / "on", kind, data=rows, max_steps=3)
    filtered.train()
    raw = _trainer(tmp_path / "off", kind, data=rows, max_steps=3, logging_nan_inf_filter=False)
    raw.train()
    assert all(np.isfinite(loss) for _, loss in _logged(filtered, "loss")[:1])
    assert any(np.isnan(loss) for _, loss in _logged(raw, "loss"))
    assert sum(np.isnan(loss) for _, loss in _logged(filtered, "loss")) < sum(np.isnan(loss) for _, loss in _logged(raw, "loss"))


@pytest.mark.parametrize("kind", KINDS)
def test_log_levels(tmp_path, kind, monkeypatch):
    xtrainer_logger = logging.getLogger("xtrainer")
    before = xtrainer_logger.level
    try:
        _trainer(tmp_path, kind, log_level="error")
        assert xtrainer_logger.level == logging.ERROR
        _trainer(tmp_path, kind, log_level="info")
        assert xtrainer_logger.level == logging.INFO
        args = _args(tmp_path, kind, log_level="info", log_level_replica="critical")
        env = ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"} if kind == "jax" else {"WORLD_SIZE": "2", "RANK": "1"})
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("LOCAL_RANK", "1")
        assert args.get_process_log_level() == logging.CRITICAL  # a replica uses log_level_replica
    finally:
        xtrainer_logger.setLevel(before)


@pytest.mark.parametrize("kind", KINDS)
def test_process_roles(tmp_path, kind, monkeypatch):
    """log_on_each_node / save_on_each_node: which processes log and write files (a replica's view)."""
    env = ({"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"} if kind == "jax" else {"WORLD_SIZE": "4", "RANK": "2"})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LOCAL_RANK", "0")  # the main process of the second node
    _needs(kind)
    node_main = _args(tmp_path, kind, save_on_each_node=True, log_on_each_node=True)
    assert node_main.should_save and node_main.should_log
    only_global = _args(tmp_path, kind, save_on_each_node=False, log_on_each_node=False)
    assert not only_global.should_save and not only_global.should_log


@pytest.mark.parametrize("kind", KINDS)
def test_progress_bar(tmp_path, kind):
    quiet = _trainer(tmp_path, kind, disable_tqdm=True)
    loud = _trainer(tmp_path, kind, disable_tqdm=False)
    assert any(isinstance(cb, xtrainer.PrinterCallback) for cb in quiet.callback_handler.callbacks)
    assert any(isinstance(cb, xtrainer.ProgressCallback) for cb in loud.callback_handler.callbacks)


@pytest.mark.parametrize("kind", KINDS)
def test_run_name_reaches_the_integrations(tmp_path, kind):
    with pytest.warns(DeprecationWarning):
        trainer = _trainer(tmp_path / "out", kind, report_to=["jsonl", "tensorboard"], logging_dir=str(tmp_path / "tb"))
    trainer.train()
    lines = (tmp_path / "out" / "log_history.jsonl").read_text().splitlines()
    assert len(lines) == len(trainer.state.log_history)
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))


# ---------------------------------------------------------------- evaluation


class EvalCounter(xtrainer.TrainerCallback):
    def __init__(self):
        self.batches = 0

    def on_prediction_step(self, args, state, control, **kwargs):
        self.batches += 1


@pytest.mark.parametrize("kind", KINDS)
def test_evaluation(tmp_path, kind):
    counter = EvalCounter()
    trainer = _trainer(tmp_path, kind, max_steps=8, eval_strategy="steps", eval_steps=2, eval_delay=3,
                       eval_on_start=True, eval_dataset=_rows(16, seed=1), callbacks=[counter])
    trainer.train()
    assert [step for step, _ in _logged(trainer, "eval_loss")] == [0, 4, 6, 8]
    batch = trainer.args.per_device_eval_batch_size * trainer.backend.local_batch_devices
    assert counter.batches == 4 * -(-16 // batch)
    bigger_counter = EvalCounter()
    bigger = _trainer(tmp_path / "b", kind, eval_dataset=_rows(16, seed=1),
                      per_device_eval_batch_size=2 * trainer.args.per_device_eval_batch_size, callbacks=[bigger_counter])
    bigger.evaluate()
    assert bigger_counter.batches == -(-16 // (2 * batch))
    moves = []
    chunked = _trainer(tmp_path / "c", kind, eval_dataset=_rows(16, seed=1), eval_accumulation_steps=1,
                       compute_metrics=_metrics)
    original = chunked.backend.to_host
    chunked.backend.to_host = lambda tree: moves.append(1) or original(tree)
    chunked.evaluate()
    whole = _trainer(tmp_path / "w", kind, eval_dataset=_rows(16, seed=1), compute_metrics=_metrics)
    original_whole, whole_moves = whole.backend.to_host, []
    whole.backend.to_host = lambda tree: whole_moves.append(1) or original_whole(tree)
    whole.evaluate()
    assert len(moves) > len(whole_moves)  # eval_accumulation_steps moves results to the host batch by batch


@pytest.mark.parametrize("kind", KINDS)
def test_evaluation_outputs(tmp_path, kind):
    data = _rows(16, seed=1)
    loss_only = _trainer(tmp_path / "a", kind, prediction_loss_only=True).predict(data)
    assert loss_only.predictions is None and np.isfinite(loss_only.metrics["test_loss"])
    batches = _trainer(tmp_path / "b", kind, eval_do_concat_batches=False).predict(data)
    assert isinstance(batches.predictions, list) and len(batches.predictions) >= 2
    seen = {}

    def keep(prediction, compute_result=None):
        seen["inputs"], seen["losses"] = prediction.inputs is not None, prediction.losses is not None
        seen.setdefault("calls", 0)
        seen["calls"] += 1
        return {"n": 1.0}

    _trainer(tmp_path / "c", kind, include_for_metrics=["inputs", "loss"], compute_metrics=keep,
             eval_dataset=data).evaluate()
    assert seen == {"inputs": True, "losses": True, "calls": 1}
    seen.clear()
    per_batch = _trainer(tmp_path / "d", kind, batch_eval_metrics=True, compute_metrics=keep, eval_dataset=data)
    per_batch.evaluate()
    assert seen["calls"] >= 2  # once per batch
    # label_names says which inputs are the labels handed back for metrics.
    targets = [{**row, "target": 2.0 * row["labels"]} for row in _rows(16, seed=1)]
    out = _trainer(tmp_path / "e", kind, label_names=["target"]).predict(targets)
    np.testing.assert_allclose(np.asarray(out.label_ids).reshape(-1), [r["target"] for r in targets], rtol=1e-6)


# ---------------------------------------------------------------- saving, best model, resuming


def _checkpoints(path) -> list[int]:
    return sorted(int(p.rsplit("-", 1)[1]) for p in glob.glob(os.path.join(str(path), "checkpoint-*")))


@pytest.mark.parametrize("kind", KINDS)
def test_saving_and_rotation(tmp_path, kind):
    trainer = _trainer(tmp_path / "out", kind, max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=2)
    trainer.train()
    assert _checkpoints(tmp_path / "out") == [4, 6]
    light = _trainer(tmp_path / "light", kind, max_steps=2, save_strategy="steps", save_steps=2, save_only_model=True)
    light.train()
    files = [os.path.relpath(p, tmp_path / "light" / "checkpoint-2") for p in
             glob.glob(str(tmp_path / "light" / "checkpoint-2" / "**" / "*"), recursive=True)]
    full = [os.path.relpath(p, tmp_path / "out" / "checkpoint-6") for p in
            glob.glob(str(tmp_path / "out" / "checkpoint-6" / "**" / "*"), recursive=True)]
    if kind == "jax":  # one orbax state: its tree holds no optimizer state
        metadata = (tmp_path / "light" / "checkpoint-2" / "jax_state" / "_METADATA").read_text()
        assert "opt_state" not in metadata and "opt_state" in (tmp_path / "out" / "checkpoint-6" / "jax_state" / "_METADATA").read_text()
    else:
        assert len(files) < len(full)  # no optimizer / scheduler / RNG files
        assert not any("optimizer" in f for f in files) and any("optimizer" in f for f in full)
    by_epoch = _trainer(tmp_path / "epoch", kind, max_steps=-1, num_train_epochs=2, save_strategy="epoch")
    by_epoch.train()
    assert _checkpoints(tmp_path / "epoch") == [by_epoch.state.global_step // 2, by_epoch.state.global_step]


@pytest.mark.parametrize("kind", KINDS)
def test_best_model(tmp_path, kind):
    def run(name, greater):
        trainer = _trainer(tmp_path / name, kind, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                           save_steps=2, load_best_model_at_end=True, metric_for_best_model="mse",
                           greater_is_better=greater, eval_dataset=_rows(16, seed=1), compute_metrics=_metrics)
        trainer.train()
        mses = {step: value for step, value in _logged(trainer, "eval_mse")}
        return trainer, mses

    lower, mses = run("lower", False)
    higher, _ = run("higher", True)
    assert min(mses, key=mses.get) != max(mses, key=mses.get)
    assert lower.state.best_model_checkpoint.endswith(f"checkpoint-{min(mses, key=mses.get)}")
    assert higher.state.best_model_checkpoint.endswith(f"checkpoint-{max(mses, key=mses.get)}")
    assert lower.state.best_metric == pytest.approx(min(mses.values()))
    # load_best_model_at_end: the weights of the best checkpoint, not the last step's.
    assert higher.evaluate()["eval_mse"] == pytest.approx(max(mses.values()), rel=1e-5)


class Counter(xtrainer.TrainerCallback, xtrainer.callbacks.ExportableState):
    """A stateful callback: counts steps; its count is saved in checkpoints."""

    def __init__(self, steps: int = 0):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1

    def state(self) -> dict:
        return {"args": {"steps": self.steps}, "attributes": {}}


@pytest.mark.parametrize("kind", KINDS)
def test_resume(tmp_path, kind):
    first = _trainer(tmp_path, kind, max_steps=4, save_strategy="steps", save_steps=2, train_sampling_strategy="random",
                     callbacks=[Counter()])
    first.train()
    checkpoint = str(tmp_path / "checkpoint-2")
    resumed = _trainer(tmp_path, kind, max_steps=4, train_sampling_strategy="random", resume_from_checkpoint=checkpoint,
                       restore_callback_states_from_checkpoint=True, callbacks=[Counter()])
    resumed.train()  # resume_from_checkpoint comes from the arguments
    assert resumed.state.global_step == 4
    assert [c for c in resumed.callback_handler.callbacks if isinstance(c, Counter)][0].steps == 2 + 2
    assert _logged(resumed, "loss")[-1][1] == pytest.approx(_logged(first, "loss")[-1][1], rel=1e-5)
    fresh = _trainer(tmp_path, kind, max_steps=4, train_sampling_strategy="random", resume_from_checkpoint=checkpoint,
                     callbacks=[Counter()])
    fresh.train()
    assert [c for c in fresh.callback_handler.callbacks if isinstance(c, Counter)][0].steps == 2  # not restored
    skipped = _trainer(tmp_path, kind, max_steps=4, train_sampling_strategy="random", resume_from_checkpoint=checkpoint,
                       ignore_data_skip=True)
    skipped.train()  # starts the epoch's data again instead of skipping what the first run saw
    assert _logged(skipped, "loss")[-1][1] != pytest.approx(_logged(first, "loss")[-1][1], rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_sigterm_checkpoint_needs_enable_jit_checkpoint(tmp_path, kind):
    class Terminate(xtrainer.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append("handler"))
    try:
        off = _trainer(tmp_path / "off", kind, max_steps=4, callbacks=[Terminate()])
        off.train()  # transformers' default: SIGTERM is not intercepted, training goes on
        assert off.state.global_step == 4 and seen == ["handler"] and not _checkpoints(tmp_path / "off")
        on = _trainer(tmp_path / "on", kind, max_steps=4, enable_jit_checkpoint=True, callbacks=[Terminate()])
        with pytest.raises(xtrainer.TrainingPreempted):
            on.train()
        assert _checkpoints(tmp_path / "on") == [2]
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- data order


class SeenRows(xtrainer.Trainer):
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.seen = getattr(self, "seen", []) + [np.asarray(b["row"]).tolist() for b in batches if "row" in b]
        self.keys = sorted(batches[0]) if batches else []
        return batches, items


@pytest.mark.parametrize("kind", KINDS)
def test_data_order(tmp_path, kind):
    def order(name, **kw):
        trainer = _trainer(tmp_path / name, kind, trainer_cls=SeenRows, max_steps=3, **kw)
        trainer.train()
        return trainer.seen[:3], trainer

    sequential, _ = order("seq", train_sampling_strategy="sequential")
    assert sequential[0] == sorted(sequential[0]) and sequential[0][0] == 0
    random_a, _ = order("ra", train_sampling_strategy="random", seed=1)
    random_b, _ = order("rb", train_sampling_strategy="random", seed=2)
    assert random_a != sequential and random_a != random_b
    seeded, _ = order("ds", train_sampling_strategy="random", seed=1, data_seed=2)
    assert seeded == random_b  # data_seed, not seed, orders the data
    import datasets

    # A datasets.Dataset's length column is read as the lengths (a list's examples give len(input_ids)).
    table = datasets.Dataset.from_list([{**r, "x": r["x"].tolist(), "size": r["length"]} for r in _rows(40)])
    grouped, _ = order("gl", data=table, train_sampling_strategy="group_by_length", length_column_name="size")
    lengths = [[r % 7 for r in batch] for batch in grouped]
    assert all(max(b) - min(b) <= max(1, len(b) // 2) for b in lengths)  # similar lengths share a batch
    if kind != "jax":  # remove_unused_columns needs the model's argument names (the torch model takes **kwargs)
        return
    _, kept = order("keep", remove_unused_columns=False)
    _, dropped = order("drop", remove_unused_columns=True)
    assert "row" in kept.keys and "row" not in dropped.keys


# ---------------------------------------------------------------- token counts and generation


@pytest.mark.parametrize("kind", KINDS)
def test_token_count_normalisation(tmp_path, kind):
    """average_tokens_across_devices: the window's label-token count is summed over processes (the sum is
    asked of the backend for every window), or left per process."""
    from helpers import lm_data, tiny_gpt2

    counted = []
    for flag in (True, False):
        _needs(kind)
        args = _args(tmp_path / str(flag), kind, max_steps=2, average_tokens_across_devices=flag)
        trainer = xtrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_data(16)) if kind != "jax" else None
        if trainer is None:
            from flax import nnx

            from jax_models import LogitsOnlyClassifier, classification_rows

            trainer = xtrainer.Trainer(model=LogitsOnlyClassifier(nnx.Rngs(0)), args=args,
                                       train_dataset=classification_rows(32))
        calls = []
        original = trainer.backend.all_sum
        trainer.backend.all_sum = lambda value: calls.append(value) or original(value)
        trainer.train()
        counted.append(len(calls))
    assert counted[0] >= 2 and counted[1] == 0


def _tiny_t5_and_rows(kind):
    import transformers

    config = transformers.T5Config(vocab_size=24, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
                                   relative_attention_num_buckets=8, initializer_factor=1.0)
    torch.manual_seed(8)  # a model whose beam search and greedy search disagree on these inputs
    hf = transformers.T5ForConditionalGeneration(config).eval()
    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(2, 24, size=5).astype(np.int64), "attention_mask": np.ones(5, np.int64),
             "labels": rng.integers(2, 24, size=4).astype(np.int64)} for _ in range(8)]
    if kind == "jax":
        from xtrainer.models import load_hf_t5

        return hf, load_hf_t5(hf), rows
    return hf, hf, rows


@pytest.mark.parametrize("kind", KINDS)
def test_generation_fields(tmp_path, kind):
    """predict_with_generate, generation_max_length, generation_num_beams and generation_config reach generate."""
    _needs(kind)
    import transformers

    hf, model, rows = _tiny_t5_and_rows(kind)

    def predict(**kw):
        args = _args(tmp_path, kind, _seq2seq=True, **kw)
        return xtrainer.Seq2SeqTrainer(model=model, args=args).predict(rows).predictions

    ids = torch.tensor(np.stack([r["input_ids"] for r in rows]))
    with torch.no_grad():
        greedy = hf.generate(input_ids=ids, max_length=6, num_beams=1).numpy()
        beams = hf.generate(input_ids=ids, max_length=6, num_beams=3).numpy()
    assert not np.array_equal(greedy, beams)  # so the test can tell the settings apart
    got_greedy = predict(predict_with_generate=True, generation_max_length=6)
    got_beams = predict(predict_with_generate=True, generation_max_length=6, generation_num_beams=3)
    with torch.no_grad():
        longer = hf.generate(input_ids=ids, max_length=20, num_beams=1).numpy()
    assert (longer[:, 6:] != 0).any()  # without generation_max_length the model would go on
    got_greedy, got_beams = np.asarray(got_greedy), np.asarray(got_beams)
    np.testing.assert_array_equal(got_greedy[:, :6], greedy)
    assert (got_greedy[:, 6:] == 0).all()  # stopped at generation_max_length, then padded like transformers
    np.testing.assert_array_equal(got_beams[:, : beams.shape[1]], beams)
    config = transformers.GenerationConfig(max_length=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    short = predict(predict_with_generate=True, generation_config=config)
    assert np.asarray(short).shape[1] == 4
    outputs = predict(predict_with_generate=False)
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    assert np.asarray(logits).shape[:2] == (8, 4)  # without generation: the decoder's logits for the 4 labels
