"""report_to integrations: TensorBoard event files, log_history.jsonl, wandb offline, and the registry."""

import glob
import json
import os

import pytest

import xtrainer
from helpers import RegressionModel, regression_data
from xtrainer.integrations import (
    available_integrations,
    get_reporting_integration_callbacks,
    reporting_callbacks,
    resolve_report_to,
)
from xtrainer.integrations.jsonl import JsonlCallback, read_jsonl
from xtrainer.integrations.tensorboard import TensorBoardCallback

pytest.importorskip("tensorboard")


def _args(tmp_path, report_to, **kw):
    base = dict(backend="torch", per_device_train_batch_size=8, learning_rate=0.1, max_steps=6, logging_steps=2,
                save_strategy="no", report_to=report_to, disable_tqdm=True, train_sampling_strategy="sequential")
    return xtrainer.TrainingArguments(str(tmp_path), **{**base, **kw})


def _train(tmp_path, report_to, **kw):
    trainer = xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path, report_to, **kw),
                               train_dataset=regression_data(64), eval_dataset=regression_data(16, seed=1))
    trainer.train()
    return trainer


def _classes(trainer):
    return [type(cb) for cb in trainer.callback_handler.callbacks]


# ------------------------------------------------------------------ registry


def test_registry_resolves_names():
    assert resolve_report_to(None) == [] and resolve_report_to("none") == [] and resolve_report_to([]) == []
    assert resolve_report_to("jsonl") == ["jsonl"]
    assert resolve_report_to(["tensorboard", "jsonl", "tensorboard"]) == ["tensorboard", "jsonl"]
    assert resolve_report_to("all") == available_integrations()
    assert {"tensorboard", "jsonl"} <= set(available_integrations())
    assert get_reporting_integration_callbacks(["jsonl", "tensorboard"]) == [JsonlCallback, TensorBoardCallback]
    # Only the main process reports.
    assert reporting_callbacks("jsonl", is_main_process=False) == []
    # transformers' default is "none", and so is ours.
    assert xtrainer.TrainingArguments("x").report_to == []
    # "all" resolves in the arguments, as in transformers.
    assert xtrainer.TrainingArguments("x", report_to="all").report_to == available_integrations()


def test_unknown_integration_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"report_to='tensorbord' is not a known integration; choose from "
                                         r"'tensorboard', 'jsonl', 'wandb', 'kubeflow', 'all', 'none'"):
        xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path, ["tensorbord"]))


def test_trainer_adds_report_callbacks_after_flow_before_user(tmp_path):
    class Mine(xtrainer.TrainerCallback):
        pass

    trainer = xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path, ["jsonl", "tensorboard"]), callbacks=[Mine])
    classes = _classes(trainer)
    assert classes.index(xtrainer.DefaultFlowCallback) < classes.index(JsonlCallback) < classes.index(
        TensorBoardCallback) < classes.index(Mine)
    none = xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path, "none"))
    assert JsonlCallback not in _classes(none) and TensorBoardCallback not in _classes(none)


# ------------------------------------------------------------------ tensorboard


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _train(tmp_path, "tensorboard", eval_strategy="steps", eval_steps=3)
    run_dirs = glob.glob(str(tmp_path / "runs" / "*"))
    assert len(run_dirs) == 1 and glob.glob(os.path.join(run_dirs[0], "events.out.tfevents.*"))
    events = EventAccumulator(run_dirs[0])
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "train/train_loss"} <= set(scalars)
    logged = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    read = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in read] == [s for s, _ in logged] == [2, 4, 6]
    assert [v for _, v in read] == pytest.approx([v for _, v in logged], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [3, 6]
    # The arguments are there as text, as with transformers.
    assert "args" in " ".join(events.Tags()["tensors"])


def test_tensorboard_honours_logging_dir(tmp_path):
    with pytest.warns(DeprecationWarning):
        args = _args(tmp_path / "out", "tensorboard", logging_dir=str(tmp_path / "tb"))
    xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=regression_data(64)).train()
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert not (tmp_path / "out" / "runs").exists()


# ------------------------------------------------------------------ jsonl


def test_jsonl_has_one_line_per_log(tmp_path):
    trainer = _train(tmp_path, "jsonl", eval_strategy="steps", eval_steps=3)
    lines = (tmp_path / "log_history.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == json.loads(json.dumps(trainer.state.log_history))
    assert [e["step"] for e in read_jsonl(str(tmp_path / "log_history.jsonl"))] == [2, 3, 4, 6, 6, 6]


def test_jsonl_is_append_safe_across_resume(tmp_path):
    kw = dict(save_strategy="steps", save_steps=2)
    full = _train(tmp_path / "full", "jsonl", **kw)
    path = tmp_path / "full" / "log_history.jsonl"
    before = read_jsonl(str(path))
    # Resume from step 4: the interrupted run's lines after step 4 are replaced, not duplicated.
    resumed = xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path / "full", "jsonl", **kw),
                               train_dataset=regression_data(64))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    after = read_jsonl(str(path))
    loss_steps = [e["step"] for e in after if "loss" in e]
    assert loss_steps == [2, 4, 6]
    assert after[:2] == before[:2]  # steps 2 and 4 kept from the first run
    assert after[2]["loss"] == pytest.approx(before[2]["loss"], rel=1e-6)  # step 6 logged again, same value
    assert len(after) == len(before) == len(full.state.log_history)


def test_jsonl_writes_non_finite_values(tmp_path):
    callback = JsonlCallback()
    args = _args(tmp_path, "none")
    state = xtrainer.TrainerState(global_step=3)
    import numpy as np

    callback.on_log(args, state, xtrainer.TrainerControl(), logs={"loss": np.float32("nan"), "n": np.int64(2)})
    assert read_jsonl(str(tmp_path / "log_history.jsonl")) == [{"loss": "nan", "n": 2, "step": 3}]


# ------------------------------------------------------------------ wandb


def test_wandb_offline_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "xtrainer-test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from xtrainer.integrations.wandb import WandbCallback

    trainer = _train(tmp_path / "out", "wandb", run_name="tiny-run")
    assert WandbCallback in _classes(trainer)
    run = wandb.run
    assert run is not None and run.name == "tiny-run" and run.project == "xtrainer-test"
    assert run.config["learning_rate"] == pytest.approx(0.1)
    last_loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]
    assert run.summary["train/loss"] == pytest.approx(last_loss, rel=1e-6)
    assert run.summary["train_loss"] == pytest.approx(trainer.state.log_history[-1]["train_loss"], rel=1e-6)
    wandb.finish()
    offline = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(offline) == 1 and glob.glob(os.path.join(offline[0], "*.wandb"))
