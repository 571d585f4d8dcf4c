"""The loop's TrainingArguments fields on every backend: each assertion fails if its field is ignored.

The front runs the same loop for every backend; these runs check that each field reaches it, and
the backend's part of it (checkpoint contents, weights, SIGTERM), on jax, torch and torch_xla.
"""

import json
import os
import signal

import datasets
import numpy as np
import pytest

import xtrainer
from field_probes import RecordingCollator, backend_params, make_trainer, rows, state_weights
from xtrainer import data as xdata
from xtrainer.callbacks import ExportableState

pytestmark = pytest.mark.parametrize("backend", backend_params())

EVAL_BASE = 1000  # eval rows have ids from here, train rows below


def _steps(trainer, key):
    return [h["step"] for h in trainer.state.log_history if key in h]


def _checkpoints(path):
    return sorted((p for p in os.listdir(path) if p.startswith("checkpoint-")), key=lambda p: int(p.split("-")[1]))


def _holds_optimizer_state(checkpoint, backend) -> bool:
    if backend == "jax":
        files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(checkpoint, "jax_state")) for f in fs]
        return any("opt_state" in open(f, errors="ignore").read() for f in files if os.path.getsize(f) < 1 << 20)
    return os.path.exists(os.path.join(checkpoint, "optimizer.pt"))


def test_log_eval_save_schedule(tmp_path, backend):
    collator = RecordingCollator()
    out = tmp_path / "out"
    trainer = make_trainer(
        backend, out, max_steps=6, logging_steps=2, logging_first_step=True, eval_strategy="steps", eval_steps=2,
        eval_delay=3, eval_on_start=True, per_device_eval_batch_size=2, save_strategy="steps", save_steps=3,
        save_total_limit=1, save_only_model=True, include_num_input_tokens_seen="non_padding", report_to="jsonl",
        disable_tqdm=True, data_collator=collator, train_dataset=rows(64), eval_dataset=rows(16, start=EVAL_BASE),
    )
    devices = trainer.backend.local_batch_devices
    trainer.train()
    assert trainer.state.global_step == 6  # max_steps
    assert _steps(trainer, "loss") == [1, 2, 4, 6]  # logging_first_step, logging_steps (logging_strategy="steps")
    assert _steps(trainer, "eval_loss") == [0, 4, 6]  # eval_on_start; eval_steps=2 after eval_delay=3
    assert _checkpoints(out) == ["checkpoint-6"]  # save_steps=3 (3 and 6), save_total_limit=1, output_dir
    assert not _holds_optimizer_state(str(out / "checkpoint-6"), backend)  # save_only_model
    train_batches, eval_batches = collator.ids(0, EVAL_BASE), collator.ids(EVAL_BASE, 10 * EVAL_BASE)
    assert {len(b) for b in train_batches} == {devices}  # per_device_train_batch_size=1
    assert len(eval_batches[0]) == 2 * devices  # per_device_eval_batch_size=2
    # sequential order (the loader may collate one batch ahead of the last step)
    assert [i for b in train_batches[:6] for i in b] == list(range(6 * devices))
    masks = [r["attention_mask"].sum() for r in rows(64)[: 6 * devices]]
    assert trainer.state.num_input_tokens_seen == sum(masks)  # "non_padding" counts attention_mask ones
    logged = [json.loads(line) for line in open(out / "log_history.jsonl")]  # report_to="jsonl"
    assert [e["step"] for e in logged] == [h["step"] for h in trainer.state.log_history]
    kinds = {type(cb).__name__ for cb in trainer.callback_handler.callbacks}
    assert "PrinterCallback" in kinds and "ProgressCallback" not in kinds  # disable_tqdm=True


def test_epochs_order_and_columns(tmp_path, backend):
    probe_rows = rows(64)
    n_tok = np.random.default_rng(3).integers(1, 50, size=len(probe_rows))
    for row, length in zip(probe_rows, n_tok):
        row["n_tok"], row["junk"] = int(length), 7  # "junk": a column the model does not take
    collator = RecordingCollator()
    trainer = make_trainer(
        backend, tmp_path, args_class=xtrainer.Seq2SeqTrainingArguments, sortish_sampler=True,
        length_column_name="n_tok", train_sampling_strategy="random", num_train_epochs=2, seed=1, data_seed=5,
        dataloader_drop_last=True, per_device_train_batch_size=2, data_collator=collator, train_dataset=None,
    )
    devices = trainer.backend.local_batch_devices
    data_rows = probe_rows[: 6 * devices + 1]  # 3 full batches of 2 x devices per epoch, and a short one dropped
    # A datasets.Dataset: transformers reads length_column_name from one (other datasets get input lengths).
    trainer.train_dataset = datasets.Dataset.from_list([{k: np.asarray(v).tolist() for k, v in r.items()}
                                                        for r in data_rows])
    trainer.train()
    assert trainer.args.train_sampling_strategy == "group_by_length"  # sortish_sampler picks it
    assert trainer.state.global_step == 6  # num_train_epochs=2 x 3 batches (dataloader_drop_last)
    lengths = [r["n_tok"] for r in data_rows]
    expected = xdata.epoch_order(len(data_rows), "group_by_length", 5, 0, lengths, 2 * devices)[: 6 * devices]
    seen = [i for b in collator.ids()[:3] for i in b]
    assert seen == list(expected)  # grouped by the length column, shuffled with data_seed (not seed)
    assert all("junk" not in keys and "n_tok" not in keys for _, keys in collator.batches)  # remove_unused_columns


def test_best_model_is_tracked_and_loaded(tmp_path, backend):
    scores = iter([3.0, 1.0, 2.0])  # evaluations at steps 2, 4, 6: lowest (best here) at step 4
    weights_at = {}

    class Snapshot(xtrainer.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            weights_at[state.global_step] = state_weights(trainer)

    trainer = make_trainer(
        backend, tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=False, learning_rate=0.05,
        train_dataset=rows(64), eval_dataset=rows(8, start=EVAL_BASE), compute_metrics=lambda p: {"score": next(scores)},
        callbacks=[Snapshot()],
    )
    trainer.train()
    assert trainer.state.best_metric == 1.0 and trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    np.testing.assert_allclose(state_weights(trainer), weights_at[4], rtol=1e-6)  # load_best_model_at_end
    assert not np.allclose(weights_at[4], weights_at[6])


class Counter(xtrainer.TrainerCallback, ExportableState):
    """A stateful callback: its count goes into checkpoints (restored only when asked)."""

    def __init__(self, count: int = 0):
        self.count = count

    def on_step_end(self, args, state, control, **kwargs):
        self.count += 1

    def state(self):
        return {"args": {"count": self.count}, "attributes": {}}


def test_resume_fields(tmp_path, backend):
    out = tmp_path / "out"
    first = make_trainer(backend, out, max_steps=4, save_strategy="steps", save_steps=2, train_dataset=rows(64),
                         callbacks=[Counter()])
    first.train()
    collator = RecordingCollator()
    resumed = make_trainer(backend, out, max_steps=4, resume_from_checkpoint=str(out / "checkpoint-2"),
                           ignore_data_skip=True, restore_callback_states_from_checkpoint=True,
                           train_dataset=rows(64), data_collator=collator, callbacks=[Counter()])
    resumed.train()  # no argument: args.resume_from_checkpoint is used
    assert _steps(resumed, "loss") == [1, 2, 3, 4]  # history of steps 1-2 from the checkpoint, then 3-4
    assert len(collator.ids()) <= 3  # two steps run (and one batch collated ahead)
    assert collator.ids()[0][0] == 0  # ignore_data_skip: the epoch's data starts again from its first batch
    counter = next(cb for cb in resumed.callback_handler.callbacks if isinstance(cb, Counter))
    assert counter.count == 4  # 2 restored + 2 steps: restore_callback_states_from_checkpoint
    fresh = make_trainer(backend, tmp_path / "again", max_steps=4, train_dataset=rows(64), callbacks=[Counter()])
    fresh.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    counter = next(cb for cb in fresh.callback_handler.callbacks if isinstance(cb, Counter))
    assert counter.count == 2  # the default (False) leaves callback state alone, as in transformers


def test_nan_losses_in_the_logs(tmp_path, backend):
    data = rows(64)
    trainer = make_trainer(backend, tmp_path, max_steps=4, logging_steps=2, logging_nan_inf_filter=False,
                           train_dataset=data)
    devices = trainer.backend.local_batch_devices
    data[3 * devices]["x"][1] = np.nan  # one row of step 4: its loss is NaN
    trainer.train()
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert np.isfinite(logged[2]) and np.isnan(logged[4])  # not filtered: logging_nan_inf_filter=False


def test_seed_is_set_when_the_trainer_is_built(tmp_path, backend):
    import torch

    trainer = make_trainer(backend, tmp_path, seed=123)
    drawn = (np.random.rand(), torch.rand(1).item())
    np.random.seed(123)
    torch.manual_seed(123)
    assert drawn == (np.random.rand(), torch.rand(1).item())  # seed: python/numpy/torch seeded at construction
    if backend == "jax":
        import jax

        state = trainer.backend.init_state(1)
        assert np.array_equal(jax.random.key_data(state["rng"]), jax.random.key_data(jax.random.PRNGKey(123)))


def test_sigterm_is_left_alone_without_enable_jit_checkpoint(tmp_path, backend):
    seen = []

    class Probe(xtrainer.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    trainer = make_trainer(backend, tmp_path / "off", max_steps=2, train_dataset=rows(32), callbacks=[Probe()])
    trainer.train()
    assert seen and all(h is before for h in seen)  # default False: SIGTERM keeps its handler

    class Kill(xtrainer.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer = make_trainer(backend, tmp_path / "on", max_steps=4, enable_jit_checkpoint=True, train_dataset=rows(32),
                           callbacks=[Kill()])
    with pytest.raises(xtrainer.TrainingPreempted) as info:
        trainer.train()
    assert info.value.step == 2 and os.path.isdir(info.value.checkpoint)
    assert signal.getsignal(signal.SIGTERM) is before
