"""The Trainer's reports and counters: log_metrics / save_metrics, total_flos, the training banner, resume
warnings, trainer.accelerator, model cards; equal to transformers' where both compute the same thing."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch

import xtrainer
from helpers import RegressionModel, lm_data, regression_data, tiny_gpt2

transformers = pytest.importorskip("transformers")


def _args(tmp_path, **kw):
    base = dict(backend="torch", per_device_train_batch_size=4, max_steps=4, logging_steps=2, report_to="none",
                disable_tqdm=True, save_strategy="no")
    base.update(kw)
    return xtrainer.TrainingArguments(str(tmp_path), **base)


def test_log_and_save_metrics_like_transformers(tmp_path, capsys):
    metrics = {"train_runtime": 12.3456, "train_loss": 0.123456789, "total_flos": 3 * 2**30, "epoch": 2.0,
               "train_mem_cpu_alloc_delta": 5 * 2**20}
    assert xtrainer.Trainer.metrics_format(metrics) == transformers.trainer_pt_utils.metrics_format(metrics)
    trainer = xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path))
    trainer.log_metrics("train", metrics)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "***** train metrics *****"
    assert any(l.split() == ["train_runtime", "=", "0:00:12.34"] for l in lines)
    assert any(l.split() == ["total_flos", "=", "3GF"] for l in lines)
    trainer.save_metrics("train", {"a": 1})
    trainer.save_metrics("eval", {"b": 2})
    trainer.save_metrics("test", {"c": 3}, combined=False)
    assert json.loads((tmp_path / "train_results.json").read_text()) == {"a": 1}
    assert json.loads((tmp_path / "all_results.json").read_text()) == {"a": 1, "b": 2}


def test_total_flos_counts_like_transformers(tmp_path):
    """6 x tokens x non-embedding parameters per micro-batch, as transformers' Trainer counts them."""
    data = lm_data(16)
    ours = xtrainer.Trainer(model=tiny_gpt2(), args=_args(tmp_path / "x", gradient_accumulation_steps=2),
                            train_dataset=data)
    out = ours.train()
    hf_args = transformers.TrainingArguments(str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=4,
                                             gradient_accumulation_steps=2, report_to="none", use_cpu=True,
                                             save_strategy="no", disable_tqdm=True)
    theirs = transformers.Trainer(model=tiny_gpt2(), args=hf_args, train_dataset=data)
    theirs.train()
    assert out.metrics["total_flos"] == ours.state.total_flos == theirs.state.total_flos > 0
    assert ours.get_num_trainable_parameters() == theirs.get_num_trainable_parameters()


def test_banner_and_resume_warnings(tmp_path, caplog):
    first = xtrainer.Trainer(model=RegressionModel(), train_dataset=regression_data(32),
                             args=_args(tmp_path, save_strategy="steps", save_steps=2, log_level="info"))
    with caplog.at_level(logging.INFO, logger="xtrainer"):
        first.train()
    text = caplog.text
    assert "***** Running training *****" in text and "Total optimization steps = 4" in text
    assert "Number of trainable parameters = 2" in text
    caplog.clear()
    resumed = xtrainer.Trainer(model=RegressionModel(), train_dataset=regression_data(32),
                               args=_args(tmp_path, save_strategy="steps", save_steps=3, per_device_train_batch_size=2))
    with caplog.at_level(logging.WARNING, logger="xtrainer"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "save_steps: 3 (from args) != 2 (from trainer_state.json)" in caplog.text
    assert "per_device_train_batch_size: 2 (from args) != 4 (from trainer_state.json)" in caplog.text


def test_evaluation_and_prediction_banners(tmp_path, caplog):
    trainer = xtrainer.Trainer(model=RegressionModel(), eval_dataset=regression_data(10),
                               args=_args(tmp_path, per_device_eval_batch_size=4, log_level="info"))
    with caplog.at_level(logging.INFO, logger="xtrainer"):
        trainer.evaluate()
        trainer.predict(regression_data(6))
    lines = [r.getMessage() for r in caplog.records]
    evaluation = lines.index("***** Running Evaluation *****")
    assert lines[evaluation + 1:evaluation + 3] == ["  Num examples = 10", "  Batch size = 4"]
    prediction = lines.index("***** Running Prediction *****")
    assert lines[prediction + 1:prediction + 3] == ["  Num examples = 6", "  Batch size = 4"]


def test_the_default_handler_prints_only_while_logging_is_not_configured(monkeypatch):
    from xtrainer.compat import banner

    banner.install_default_handler()
    banner.install_default_handler()
    handlers = [h for h in logging.getLogger("xtrainer").handlers if isinstance(h, banner._DefaultHandler)]
    assert len(handlers) == 1
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)  # it writes to the current sys.stderr
    record = logging.LogRecord("xtrainer.trainer", logging.INFO, __file__, 1, "***** Running training *****", None,
                               None)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    handlers[0].handle(record)
    assert stream.getvalue() == "***** Running training *****\n"
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.NullHandler()])  # the application configured logging
    handlers[0].handle(record)
    assert stream.getvalue() == "***** Running training *****\n"


def test_end_destroys_the_torch_process_group(tmp_path):
    import torch.distributed as dist

    trainer = xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path))
    trainer.end()  # no process group: nothing to end, no error
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", world_size=1, rank=0)
    try:
        trainer.end()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_accelerator_view_answers_what_libraries_read(tmp_path):
    trainer = xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path, accelerator_config={"split_batches": True}))
    accelerator = trainer.accelerator
    assert accelerator.is_main_process and accelerator.num_processes == 1 and accelerator.split_batches
    assert str(accelerator.device) == "cpu" and accelerator.gather(3) == 3
    assert accelerator.unwrap_model(trainer.model) is trainer.model
    assert accelerator.unwrap_model(torch.nn.DataParallel(trainer.model)) is trainer.model
    with pytest.raises(AttributeError, match="does not run accelerate"):
        accelerator.state
    with pytest.raises(NotImplementedError, match="does not run accelerate"):
        trainer.create_accelerator_and_postprocess()
    assert (trainer.get_sp_size(), trainer.get_cp_size(), trainer.get_tp_size()) == (1, 1, 1)
    trainer.model._tp_size = 4  # transformers' tensor-parallel loading records its degree on the model
    assert trainer.get_tp_size() == 4


def test_model_card_for_torch_and_flax_models(tmp_path):
    trainer = xtrainer.Trainer(model=tiny_gpt2(), args=_args(tmp_path / "t"), train_dataset=lm_data(16))
    trainer.train()
    trainer.create_model_card(model_name="tiny", language="en", tags=["demo"])
    card = (tmp_path / "t" / "README.md").read_text()
    assert "- demo" in card and "- learning_rate: 5e-05" in card and "- training_steps: 4" in card
    pytest.importorskip("flax")
    from flax import nnx

    from jax_models import RegressionMLP, regression_rows

    flax_trainer = xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), train_dataset=regression_rows(16),
                                    args=_args(tmp_path / "f", backend="jax", per_device_train_batch_size=1))
    flax_trainer.train()
    flax_trainer.create_model_card()
    assert "RegressionMLP" in (tmp_path / "f" / "README.md").read_text() or "train_batch_size: 1" in (tmp_path / "f" / "README.md").read_text()
