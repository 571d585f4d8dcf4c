"""Parity of xtrainer.callbacks with transformers.trainer_callback (v5), plus behaviour checks."""

import dataclasses
import itertools
import json
import logging
import math
from types import SimpleNamespace

import pytest
import transformers.trainer_callback as hf
from transformers.trainer_utils import IntervalStrategy as HFInterval
from transformers.trainer_utils import SaveStrategy as HFSave

from xtrainer import callbacks as xc
from xtrainer.trainer_utils import IntervalStrategy, SaveStrategy


def _flags(control):
    return (
        control.should_training_stop,
        control.should_epoch_stop,
        control.should_save,
        control.should_evaluate,
        control.should_log,
    )


# ----------------------------------------------------------------------------------------------- TrainerState JSON


def _hf_state(stateful):
    return hf.TrainerState(
        epoch=2.5,
        global_step=120,
        max_steps=300,
        logging_steps=10,
        eval_steps=40,
        save_steps=40,
        train_batch_size=8,
        num_train_epochs=6,
        num_input_tokens_seen=123456,
        total_flos=1.5e12,
        log_history=[
            {"loss": 1.25, "grad_norm": 0.5, "learning_rate": 5e-5, "epoch": 0.25, "step": 10},
            {"eval_loss": 0.9, "eval_accuracy": 0.75, "epoch": 1.0, "step": 40},
        ],
        best_metric=0.9,
        best_global_step=40,
        best_model_checkpoint="out/checkpoint-40",
        is_local_process_zero=True,
        is_world_process_zero=False,
        is_hyper_param_search=True,
        trial_name="trial-3",
        trial_params={"learning_rate": 1e-4, "warmup": 10, "name": "x", "flag": True},
        stateful_callbacks=stateful,
    )


def test_hf_written_state_loads_into_xtrainer(tmp_path):
    es = hf.EarlyStoppingCallback(early_stopping_patience=3, early_stopping_threshold=0.01)
    es.early_stopping_patience_counter = 2
    es2 = hf.EarlyStoppingCallback(early_stopping_patience=5)
    control = hf.TrainerControl(should_save=True, should_log=True)
    hf_state = _hf_state([es, es2, control])
    path = tmp_path / "trainer_state.json"
    hf_state.save_to_json(str(path))

    ours = xc.TrainerState.load_from_json(str(path))
    assert dataclasses.asdict(ours) == dataclasses.asdict(hf_state)
    # Two callbacks of one class are stored as a list of states, in order.
    stored = ours.stateful_callbacks["EarlyStoppingCallback"]
    assert isinstance(stored, list) and len(stored) == 2
    restored = xc.EarlyStoppingCallback.from_state(stored[0])
    assert (restored.early_stopping_patience, restored.early_stopping_threshold) == (3, 0.01)
    assert restored.early_stopping_patience_counter == 2
    ctrl = xc.TrainerControl.from_state(ours.stateful_callbacks["TrainerControl"])
    assert _flags(ctrl) == _flags(control)

    # Re-saving gives the very same bytes as transformers wrote.
    again = tmp_path / "again.json"
    ours.save_to_json(str(again))
    assert again.read_text() == path.read_text()


def test_xtrainer_written_state_loads_into_hf(tmp_path):
    es = xc.EarlyStoppingCallback(early_stopping_patience=4, early_stopping_threshold=0.5)
    es.early_stopping_patience_counter = 1
    control = xc.TrainerControl(should_training_stop=True, should_evaluate=True)
    ours = xc.TrainerState(**{**dataclasses.asdict(_hf_state(None)), "stateful_callbacks": [es, control]})
    path = tmp_path / "trainer_state.json"
    ours.save_to_json(str(path))

    theirs = hf.TrainerState.load_from_json(str(path))
    assert dataclasses.asdict(theirs) == dataclasses.asdict(ours)
    hf_es = hf.EarlyStoppingCallback.from_state(theirs.stateful_callbacks["EarlyStoppingCallback"])
    assert hf_es.state() == es.state()
    assert hf.TrainerControl.from_state(theirs.stateful_callbacks["TrainerControl"]).state() == control.state()

    # Same layout as transformers' own writer for the same content.
    hf_path = tmp_path / "hf.json"
    theirs.save_to_json(str(hf_path))
    assert hf_path.read_text() == path.read_text()
    assert json.loads(path.read_text())["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"] == {
        "early_stopping_patience_counter": 1
    }


def test_state_json_handles_numpy_and_unknown_fields(tmp_path):
    np = pytest.importorskip("numpy")
    state = xc.TrainerState(log_history=[{"loss": np.float32(0.5), "step": np.int64(3)}])
    path = tmp_path / "s.json"
    state.save_to_json(str(path))
    assert json.loads(path.read_text())["log_history"] == [{"loss": 0.5, "step": 3}]
    data = json.loads(path.read_text())
    data["some_future_field"] = 1
    path.write_text(json.dumps(data))
    assert xc.TrainerState.load_from_json(str(path)).log_history[0]["step"] == 3


def test_stateful_callbacks_rejects_non_exportable():
    with pytest.raises(TypeError, match="ExportableState"):
        xc.TrainerState(stateful_callbacks=[xc.PrinterCallback()])


def test_update_and_restore_callback_states():
    es = xc.EarlyStoppingCallback(2, 0.1)
    es.early_stopping_patience_counter = 1
    control = xc.TrainerControl(should_save=True)
    handler = xc.CallbackHandler([xc.DefaultFlowCallback, es], None, None, None, None)
    state = xc.TrainerState(stateful_callbacks=[es, control])
    es.early_stopping_patience_counter = 2  # progress after the state was built
    state.update_stateful_callbacks(handler.callbacks + [control])
    assert state.stateful_callbacks["EarlyStoppingCallback"]["attributes"]["early_stopping_patience_counter"] == 2

    fresh_handler = xc.CallbackHandler([xc.DefaultFlowCallback, xc.EarlyStoppingCallback(2, 0.1)], *[None] * 4)
    new_control = xc.restore_callback_states(state, fresh_handler, xc.TrainerControl())
    assert new_control.should_save is True
    restored = [cb for cb in fresh_handler.callbacks if isinstance(cb, xc.EarlyStoppingCallback)]
    assert len(restored) == 1 and restored[0].early_stopping_patience_counter == 2


def test_trainer_control_resets_and_state():
    c = xc.TrainerControl(True, True, True, True, True)
    c._new_step()
    assert _flags(c) == (True, True, False, False, False)
    c._new_epoch()
    assert c.should_epoch_stop is False
    c._new_training()
    assert c.should_training_stop is False
    c2 = xc.TrainerControl(should_log=True)
    assert c2.state() == hf.TrainerControl(should_log=True).state()
    assert _flags(xc.TrainerControl.from_state(c2.state())) == _flags(c2)


# ------------------------------------------------------------------------------------------------- compute_steps


@pytest.mark.parametrize(
    "logging_steps,eval_steps,save_steps,max_steps",
    [(0.1, 0.25, 0.5, 1000), (0.03, 0.3333, 0.07, 77), (5, None, 0.999, 10), (1, 1, 1, 3), (0.5, 20, 500, 7)],
)
def test_compute_steps_matches_hf(logging_steps, eval_steps, save_steps, max_steps):
    args = SimpleNamespace(logging_steps=logging_steps, eval_steps=eval_steps, save_steps=save_steps)
    ours, theirs = xc.TrainerState(), hf.TrainerState()
    ours.compute_steps(args, max_steps)
    theirs.compute_steps(args, max_steps)
    assert (ours.logging_steps, ours.eval_steps, ours.save_steps) == (
        theirs.logging_steps,
        theirs.eval_steps,
        theirs.save_steps,
    )
    if logging_steps < 1:
        assert ours.logging_steps == math.ceil(logging_steps * max_steps)
    if eval_steps is None:
        assert ours.eval_steps == 500  # left at its default


def test_init_training_references():
    trainer = SimpleNamespace(
        hp_name=lambda t: f"run-{t['lr']}",
        _trial={"lr": 0.1},
        is_local_process_zero=lambda: True,
        is_world_process_zero=lambda: False,
    )
    state = xc.TrainerState()
    state.init_training_references(trainer, 50, 3, {"lr": 0.1, "wandb": {"x": 1}})
    assert (state.trial_name, state.trial_params) == ("run-0.1", {"lr": 0.1})
    assert (state.max_steps, state.num_train_epochs) == (50, 3)
    assert (state.is_local_process_zero, state.is_world_process_zero) == (True, False)


# --------------------------------------------------------------------------------------------- DefaultFlowCallback


_STRATEGY_FLAVOURS = {
    "str": (lambda s: s, lambda s: s),
    "xtrainer_enum": (IntervalStrategy, SaveStrategy),
    "hf_enum": (HFInterval, HFSave),
}


def _drive(callback, control_cls, state_cls, args, max_steps, steps_per_epoch):
    """Run a fake loop: step_end every step, epoch_end every steps_per_epoch; record the control flags."""
    state = state_cls(max_steps=max_steps)
    state.compute_steps(args, max_steps)
    trace = []
    for step in range(1, max_steps + 1):
        control = control_cls()
        state.global_step = step
        state.epoch = step / steps_per_epoch
        callback.on_step_end(args, state, control)
        trace.append(("step", step, _flags(control)))
        if step % steps_per_epoch == 0:
            control = control_cls()
            callback.on_epoch_end(args, state, control)
            trace.append(("epoch", step, _flags(control)))
    return trace


def test_default_flow_matches_hf_on_grid():
    grid = itertools.product(
        ["no", "steps", "epoch"],  # logging
        ["no", "steps", "epoch"],  # eval
        ["no", "steps", "epoch", "best"],  # save
        [(3, 4, 5), (0.25, 0.5, 0.3), (1, 7, 2)],  # logging / eval / save steps
        [False, True],  # logging_first_step
        [0, 2.5, 6],  # eval_delay (steps or epochs)
        ["str", "xtrainer_enum", "hf_enum"],
    )
    n = 0
    for log_s, eval_s, save_s, (ls, es, ss), first, delay, flavour in grid:
        interval, save = _STRATEGY_FLAVOURS[flavour]
        args = SimpleNamespace(
            logging_strategy=interval(log_s),
            eval_strategy=interval(eval_s),
            save_strategy=save(save_s),
            logging_steps=ls,
            eval_steps=es,
            save_steps=ss,
            logging_first_step=first,
            eval_delay=delay,
        )
        ours = _drive(xc.DefaultFlowCallback(), xc.TrainerControl, xc.TrainerState, args, 11, 4)
        theirs = _drive(hf.DefaultFlowCallback(), hf.TrainerControl, hf.TrainerState, args, 11, 4)
        assert ours == theirs, (log_s, eval_s, save_s, ls, es, ss, first, delay, flavour)
        n += 1
    assert n == 3 * 3 * 4 * 3 * 2 * 3 * 3


def test_default_flow_with_real_training_arguments(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="best",
        metric_for_best_model="loss",
        logging_steps=2,
        logging_first_step=True,
        report_to=[],
    )
    ours = _drive(xc.DefaultFlowCallback(), xc.TrainerControl, xc.TrainerState, args, 10, 5)
    theirs = _drive(hf.DefaultFlowCallback(), hf.TrainerControl, hf.TrainerState, args, 10, 5)
    assert ours == theirs
    # "best": never saved by the flow callback (the trainer saves after a new best evaluation).
    assert not any(flags[2] for _, _, flags in ours)
    # Last step (10) is off the eval interval but still evaluated, and training stops there.
    assert ours[-2] == ("step", 10, (True, False, False, True, True))
    assert ours[0] == ("step", 1, (False, False, False, False, True))  # logging_first_step


# ------------------------------------------------------------------------------------------ EarlyStoppingCallback


def _es_args(**kw):
    base = dict(
        metric_for_best_model="loss", greater_is_better=False, load_best_model_at_end=True, eval_strategy="steps"
    )
    base.update(kw)
    return SimpleNamespace(**base)


def _run_early_stopping(cb, args, values, update_best):
    """Feed eval metrics; the 'trainer' updates best_metric after on_evaluate. Returns index where stop was set."""
    state, control = xc.TrainerState(), xc.TrainerControl()
    cb.on_train_begin(args, state, control)
    for i, value in enumerate(values):
        key = args.metric_for_best_model
        cb.on_evaluate(args, state, control, metrics={key if key.startswith("eval_") else f"eval_{key}": value})
        if control.should_training_stop:
            return i
        if update_best(state.best_metric, value):
            state.best_metric = value
    return None


def test_early_stopping_patience_and_threshold():
    lower = lambda best, v: best is None or v < best  # noqa: E731
    # patience 2, no threshold: two non-improving evals in a row stop at the 5th value.
    assert _run_early_stopping(xc.EarlyStoppingCallback(2), _es_args(), [1.0, 0.8, 0.9, 0.7, 0.75, 0.8], lower) == 5
    assert _run_early_stopping(xc.EarlyStoppingCallback(2), _es_args(), [1.0, 0.8, 0.8, 0.8], lower) == 3
    # Improvements smaller than the threshold count as no improvement.
    es = xc.EarlyStoppingCallback(2, early_stopping_threshold=0.1)
    assert _run_early_stopping(es, _es_args(), [1.0, 0.95, 0.91, 0.5], lower) == 2
    # greater_is_better
    higher = lambda best, v: best is None or v > best  # noqa: E731
    args = _es_args(metric_for_best_model="eval_acc", greater_is_better=True)
    assert _run_early_stopping(xc.EarlyStoppingCallback(1), args, [0.5, 0.6, 0.7, 0.65], higher) == 3
    assert _run_early_stopping(xc.EarlyStoppingCallback(3), args, [0.5, 0.6, 0.7, 0.8], higher) is None


def test_early_stopping_matches_hf_counter():
    values = [1.0, 0.99, 0.7, 0.72, 0.69, 0.695, 0.5, 0.6, 0.61, 0.62]
    for patience, threshold, gib in itertools.product([1, 2, 3], [0.0, 0.005, 0.05], [False, True]):
        args = _es_args(greater_is_better=gib)
        ours, theirs = xc.EarlyStoppingCallback(patience, threshold), hf.EarlyStoppingCallback(patience, threshold)
        s1, s2 = xc.TrainerState(), hf.TrainerState()
        c1, c2 = xc.TrainerControl(), hf.TrainerControl()
        for v in values:
            ours.on_evaluate(args, s1, c1, metrics={"eval_loss": v})
            theirs.on_evaluate(args, s2, c2, metrics={"eval_loss": v})
            assert ours.early_stopping_patience_counter == theirs.early_stopping_patience_counter
            assert c1.should_training_stop == c2.should_training_stop
            better = (v > (s1.best_metric or -1e9)) if gib else (v < (s1.best_metric or 1e9))
            if better:
                s1.best_metric = s2.best_metric = v


def test_early_stopping_misconfigured(caplog):
    cb, state, control = xc.EarlyStoppingCallback(), xc.TrainerState(), xc.TrainerControl()
    with pytest.raises(ValueError, match="metric_for_best_model"):
        cb.on_train_begin(_es_args(metric_for_best_model=None), state, control)
    with pytest.raises(ValueError, match="evaluation strategy"):
        cb.on_train_begin(_es_args(eval_strategy=IntervalStrategy.NO), state, control)
    with caplog.at_level(logging.WARNING, logger="xtrainer.callbacks"):
        cb.on_train_begin(_es_args(load_best_model_at_end=False), state, control)
        cb.on_evaluate(_es_args(), state, control, metrics={"eval_other": 1.0})
    assert "load_best_model_at_end" in caplog.text
    assert "eval_loss" in caplog.text and cb.early_stopping_patience_counter == 0


# ---------------------------------------------------------------------------------------------- CallbackHandler


class _Recorder(xc.TrainerCallback):
    def __init__(self, name="r", log=None):
        self.name, self.log = name, log if log is not None else []

    def __getattribute__(self, item):
        if item in xc.TRAINER_EVENTS:
            def record(args, state, control, **kwargs):
                self.log.append((self.name, item, sorted(kwargs)))
            return record
        return super().__getattribute__(item)


class _Stopper(xc.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        return xc.TrainerControl(should_training_stop=True)


def test_handler_add_pop_remove(caplog):
    with caplog.at_level(logging.WARNING, logger="xtrainer.callbacks"):
        handler = xc.CallbackHandler([xc.PrinterCallback], None, None, None, None)
    assert "DefaultFlowCallback" in caplog.text  # warns without the flow callback
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xtrainer.callbacks"):
        handler.add_callback(xc.DefaultFlowCallback)
        assert caplog.text == ""
        handler.add_callback(xc.PrinterCallback())
    assert "there is already one" in caplog.text
    assert handler.callback_list == "PrinterCallback\nDefaultFlowCallback\nPrinterCallback"

    es = xc.EarlyStoppingCallback()
    handler.add_callback(es)
    popped = handler.pop_callback(xc.PrinterCallback)
    assert isinstance(popped, xc.PrinterCallback)
    assert handler.callback_list == "DefaultFlowCallback\nPrinterCallback\nEarlyStoppingCallback"
    assert handler.pop_callback(es) is es
    assert handler.pop_callback(es) is None
    assert handler.pop_callback(xc.ProgressCallback) is None
    handler.remove_callback(xc.DefaultFlowCallback)
    handler.remove_callback(xc.ProgressCallback)  # absent class: no error
    assert handler.callback_list == "PrinterCallback"
    with pytest.raises(ValueError):
        handler.remove_callback(xc.PrinterCallback())  # absent instance
    handler.remove_callback(handler.callbacks[0])
    assert handler.callbacks == []


def test_handler_dispatch_order_kwargs_and_resets():
    log = []
    handler = xc.CallbackHandler(
        [xc.DefaultFlowCallback(), _Recorder("a", log), _Recorder("b", log)], "model", "tok", "opt", "sched"
    )
    handler.train_dataloader, handler.eval_dataloader = "train_dl", "eval_dl"
    args, state = SimpleNamespace(), xc.TrainerState()
    base = ["eval_dataloader", "lr_scheduler", "model", "optimizer", "processing_class", "train_dataloader"]
    for event in xc.TRAINER_EVENTS:
        if event in ("on_step_end", "on_epoch_end"):
            continue  # DefaultFlowCallback needs real args there
        control = xc.TrainerControl(True, True, True, True, True)
        extra = {"metrics": {}} if event in ("on_evaluate", "on_predict") else {"logs": {}} if event == "on_log" else {}
        log.clear()
        out = getattr(handler, event)(args, state, control, **extra)
        assert out is control
        assert log == [("a", event, sorted(base + list(extra))), ("b", event, sorted(base + list(extra)))]
        expected_reset = {
            "on_train_begin": "should_training_stop",
            "on_epoch_begin": "should_epoch_stop",
            "on_evaluate": "should_evaluate",
            "on_save": "should_save",
            "on_log": "should_log",
        }
        if event == "on_step_begin":
            assert _flags(out) == (True, True, False, False, False)
        elif event in expected_reset:
            assert getattr(out, expected_reset[event]) is False
            assert sum(_flags(out)) == 4
        else:
            assert _flags(out) == (True,) * 5

    # Every event exists on the base class and matches transformers' list.
    hf_events = {n for n in dir(hf.TrainerCallback) if n.startswith("on_")}
    assert hf_events == set(xc.TRAINER_EVENTS)
    assert all(callable(getattr(xc.TrainerCallback, e)) for e in xc.TRAINER_EVENTS)


def test_handler_returned_control_replaces():
    handler = xc.CallbackHandler([xc.DefaultFlowCallback(), _Stopper()], None, None, None, None)
    args = SimpleNamespace(
        logging_strategy="no", eval_strategy="no", save_strategy="no", logging_first_step=False, eval_delay=0
    )
    control = xc.TrainerControl()
    out = handler.on_step_end(args, xc.TrainerState(global_step=1, max_steps=10), control)
    assert out is not control and out.should_training_stop and not control.should_training_stop


# ------------------------------------------------------------------------------------- Progress / Printer callbacks


def test_progress_and_printer_callbacks(capsys):
    state, control, args = xc.TrainerState(max_steps=4), xc.TrainerControl(), SimpleNamespace()
    cb = xc.ProgressCallback(max_str_len=10)
    cb.on_train_begin(args, state, control)
    for step in range(1, 4):
        state.global_step = step
        cb.on_step_end(args, state, control)
    assert cb.training_bar.n == 3
    for _ in range(2):
        cb.on_prediction_step(args, state, control, eval_dataloader=[1, 2, 3])
    assert cb.prediction_bar.n == 2 and cb.prediction_bar.total == 3
    cb.on_evaluate(args, state, control, metrics={})
    assert cb.prediction_bar is None
    logs = {"loss": 0.123456789, "text": "x" * 50, "total_flos": 1.0}
    cb.on_log(args, state, control, logs=logs)
    cb.on_train_end(args, state, control)
    assert cb.training_bar is None
    out = capsys.readouterr()
    printed = out.out + out.err
    assert "'loss': '0.1235'" in printed and "length: 50 > 10" in printed and "total_flos" not in printed
    assert "total_flos" in logs  # the caller's dict is not mutated

    # Not the main process: no bars, nothing written.
    other = xc.TrainerState(max_steps=4, is_world_process_zero=False)
    cb2 = xc.ProgressCallback()
    cb2.on_train_begin(args, other, control)
    cb2.on_step_end(args, other, control)
    cb2.on_log(args, other, control, logs={"loss": 1.0})
    cb2.on_train_end(args, other, control)
    assert cb2.training_bar is None

    xc.PrinterCallback().on_log(args, state, control, logs={"loss": 0.5, "total_flos": 3.0, "step": 2})
    assert capsys.readouterr().out.strip() == "{'loss': '0.5', 'step': 2}"
    xc.PrinterCallback().on_log(args, xc.TrainerState(is_local_process_zero=False), control, logs={"loss": 1.0})
    assert capsys.readouterr().out == ""
