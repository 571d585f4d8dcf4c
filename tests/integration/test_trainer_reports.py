"""transformers' reports around the loop: banners, total_flos, log_metrics / save_metrics, the model card, and the
members that stand in for accelerate (compare with transformers' own Trainer where both run the same thing)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import types

import numpy as np
import pytest

import xtrainer
from helpers import RegressionModel, lm_data, tiny_gpt2
from xtrainer.compat import metrics_report, model_card, run_logs

transformers = pytest.importorskip("transformers")

COMMON = dict(per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=0.05, report_to="none",
              disable_tqdm=True, train_sampling_strategy="sequential", seed=7)


def _xt_args(path, **kw):
    return xtrainer.TrainingArguments(str(path), backend="torch", **{**COMMON, **kw})


# ------------------------------------------------------------------ total_flos


def test_total_flos_matches_transformers(tmp_path):
    """Same model, data and steps: total_flos in the state, the train metrics and each checkpoint equal transformers'."""
    kw = dict(max_steps=4, logging_steps=3, save_strategy="steps", save_steps=2, gradient_accumulation_steps=2)
    hf = transformers.Trainer(model=tiny_gpt2(), args=transformers.TrainingArguments(str(tmp_path / "hf"), **COMMON, **kw),
                              train_dataset=lm_data(32))
    hf.train()
    xt = xtrainer.Trainer(model=tiny_gpt2(), args=_xt_args(tmp_path / "xt", **kw), train_dataset=lm_data(32))
    xt_metrics = xt.train().metrics
    assert hf.state.total_flos > 0
    assert not any("_mem_" in key for key in xt_metrics)  # skip_memory_metrics defaults to True, as in transformers
    assert xt.state.total_flos == hf.state.total_flos
    # (transformers' PrinterCallback pops total_flos from the dict train() returns; its log history keeps it)
    hf_final = [log for log in hf.state.log_history if "train_loss" in log][0]
    assert xt_metrics["total_flos"] == hf_final["total_flos"]
    for step in (2, 4):
        saved = [json.load(open(tmp_path / run / f"checkpoint-{step}" / "trainer_state.json"))["total_flos"]
                 for run in ("hf", "xt")]
        assert saved[0] == saved[1] > 0
    # transformers' estimate: 6 x tokens x non-embedding parameters
    tokens = 4 * 2 * 4 * 16  # steps x accumulation x batch x sequence length
    assert xt.state.total_flos == 6 * tokens * xt.model.num_parameters(exclude_embeddings=True)


def test_total_flos_on_jax_counts_non_embedding_parameters(tmp_path):
    pytest.importorskip("flax")
    import jax.numpy as jnp
    from flax import nnx

    class TinyLM(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(32, 8, rngs=rngs)
            self.out = nnx.Linear(8, 32, rngs=rngs)

        def __call__(self, input_ids, labels=None):
            logits = self.out(self.embed(input_ids))
            loss = -jnp.mean(jnp.take_along_axis(nnx.log_softmax(logits), labels[..., None], axis=-1))
            return {"loss": loss, "logits": logits}

    rows = [{"input_ids": np.arange(i, i + 6) % 32, "labels": np.arange(i + 1, i + 7) % 32} for i in range(16)]
    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax", per_device_train_batch_size=1, max_steps=2,
                                      logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    trainer = xtrainer.Trainer(model=TinyLM(nnx.Rngs(0)), args=args, train_dataset=rows)
    trainer.train()
    non_embedding = 8 * 32 + 32  # the output layer; the 32 x 8 embedding table is left out
    assert trainer.state.total_flos == 2 * 6 * (8 * 6) * non_embedding  # 2 steps of 8 devices x 1 row x 6 tokens
    assert [log["step"] for log in trainer.state.log_history if "loss" in log] == [1, 2]


def test_floating_point_ops_override_and_models_without_a_count(tmp_path):
    class CountsBatches(xtrainer.Trainer):
        def floating_point_ops(self, inputs):
            return 1000 * len(inputs["input_x"])

    rows = [{"input_x": float(i), "labels": float(i)} for i in range(16)]
    args = _xt_args(tmp_path, max_steps=3, logging_steps=1, save_strategy="no")
    assert CountsBatches(model=RegressionModel(), args=args, train_dataset=rows).train().metrics["total_flos"] == 12000
    # a torch module without transformers' num_parameters counts 0, as in transformers
    assert xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=rows).train().metrics["total_flos"] == 0


# ------------------------------------------------------------------ banners and resume warnings


def test_training_and_evaluation_banners_at_log_level_info(tmp_path, caplog):
    model = tiny_gpt2()
    args = _xt_args(tmp_path, num_train_epochs=2, gradient_accumulation_steps=2, logging_steps=2, save_strategy="no",
                    log_level="info", eval_strategy="no")
    trainer = xtrainer.Trainer(model=model, args=args, train_dataset=lm_data(24), eval_dataset=lm_data(10))
    with caplog.at_level(logging.INFO, logger="xtrainer"):
        trainer.train()
        trainer.evaluate()
    text = "\n".join(r.getMessage() for r in caplog.records)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for line in ("***** Running training *****", "  Num examples = 24", "  Num Epochs = 2",
                 "  Num update steps per epoch = 3", "  Instantaneous batch size per device = 4",
                 "  Total train batch size (w. parallel, distributed & accumulation) = 8",
                 "  Gradient Accumulation steps = 2", "  Total optimization steps = 6",
                 f"  Number of trainable parameters = {trainable:,}", "***** Running Evaluation *****",
                 "  Num examples = 10", "  Batch size = 4"):
        assert line in text, line
    caplog.clear()
    quiet = xtrainer.Trainer(model=tiny_gpt2(), args=_xt_args(tmp_path, max_steps=1, save_strategy="no",
                                                              log_level="warning"), train_dataset=lm_data(8))
    with caplog.at_level(logging.DEBUG):  # the root's level: the xtrainer logger keeps log_level's
        quiet.train()
    assert "***** Running training *****" not in caplog.text


def test_the_default_handler_prints_only_while_logging_is_not_configured(monkeypatch):
    run_logs.install_default_handler()
    run_logs.install_default_handler()
    library = logging.getLogger("xtrainer")
    handlers = [h for h in library.handlers if isinstance(h, run_logs._DefaultHandler)]
    assert len(handlers) == 1
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)  # the handler writes to the current sys.stderr
    record = logging.LogRecord("xtrainer.trainer", logging.INFO, __file__, 1, "***** Running training *****", None, None)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    handlers[0].handle(record)
    assert stream.getvalue() == "***** Running training *****\n"
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.NullHandler()])  # the application configured logging
    handlers[0].handle(record)
    assert stream.getvalue() == "***** Running training *****\n"


def test_resume_warns_about_arguments_that_changed(tmp_path, caplog):
    rows = [{"input_x": float(i), "labels": 2.0 * i} for i in range(16)]
    first = _xt_args(tmp_path, max_steps=4, logging_steps=1, save_steps=2)
    xtrainer.Trainer(model=RegressionModel(), args=first, train_dataset=rows).train()
    changed = _xt_args(tmp_path, max_steps=6, logging_steps=2, save_steps=2, per_device_train_batch_size=2)
    with caplog.at_level(logging.WARNING, logger="xtrainer"):
        xtrainer.Trainer(model=RegressionModel(), args=changed, train_dataset=rows).train(resume_from_checkpoint=True)
    warnings = [r.getMessage() for r in caplog.records if "do not match" in r.getMessage()]
    assert len(warnings) == 1
    assert "logging_steps: 2 (from args) != 1 (from trainer_state.json)" in warnings[0]
    assert "per_device_train_batch_size: 2 (from args) != 4 (from trainer_state.json)" in warnings[0]
    assert "save_steps" not in warnings[0]


# ------------------------------------------------------------------ log_metrics, save_metrics, metrics_format


METRICS = {"train_runtime": 3725.519, "total_flos": 5.3e12, "train_loss": 0.123456789, "epoch": 3.0,
           "train_mem_cpu_alloc_delta": 123456789, "train_samples_per_second": 12.3456, "train_steps": 40}


def test_metrics_format_and_log_metrics_print_what_transformers_prints(tmp_path):
    from transformers import trainer_pt_utils

    assert xtrainer.Trainer.metrics_format(METRICS) == trainer_pt_utils.metrics_format(METRICS)
    trainer = xtrainer.Trainer(model=RegressionModel(), args=_xt_args(tmp_path))
    assert trainer.metrics_format(METRICS) == trainer_pt_utils.metrics_format(METRICS)  # works on the instance too
    ours, theirs = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(ours):
        trainer.log_metrics("train", METRICS)
    with contextlib.redirect_stdout(theirs):
        trainer_pt_utils.log_metrics(types.SimpleNamespace(is_world_process_zero=lambda: True), "train", METRICS)
    assert ours.getvalue() == theirs.getvalue()
    assert re.search(r"train_runtime += 1:02:05.51", ours.getvalue()) and re.search(r"total_flos += +4936GF", ours.getvalue())


def test_save_metrics_writes_split_files_and_merges_all_results(tmp_path):
    trainer = xtrainer.Trainer(model=RegressionModel(), args=_xt_args(tmp_path))
    trainer.save_metrics("train", {"train_loss": 0.5, "epoch": 1.0})
    trainer.save_metrics("eval", {"eval_loss": 0.25, "epoch": 2.0})
    trainer.save_metrics("test", {"test_loss": 0.125}, combined=False)
    read = lambda name: json.load(open(tmp_path / name))  # noqa: E731
    assert read("train_results.json") == {"train_loss": 0.5, "epoch": 1.0}
    assert read("eval_results.json") == {"eval_loss": 0.25, "epoch": 2.0}
    assert read("test_results.json") == {"test_loss": 0.125}
    assert read("all_results.json") == {"train_loss": 0.5, "eval_loss": 0.25, "epoch": 2.0}  # later values win
    assert open(tmp_path / "all_results.json").read() == json.dumps(read("all_results.json"), indent=4, sort_keys=True)


# ------------------------------------------------------------------ model card


def test_model_card_matches_transformers(tmp_path):
    """The card for the same arguments and log history is transformers', up to the framework versions."""
    kw = dict(num_train_epochs=2, logging_steps=2, eval_strategy="steps", eval_steps=2, save_strategy="no",
              gradient_accumulation_steps=2, warmup_steps=2, lr_scheduler_type="cosine")
    xt = xtrainer.Trainer(model=tiny_gpt2(), args=_xt_args(tmp_path / "xt", **kw), train_dataset=lm_data(16),
                          eval_dataset=lm_data(8))
    xt.train()
    hf = transformers.Trainer(model=tiny_gpt2(), args=transformers.TrainingArguments(str(tmp_path / "xt"), **COMMON, **kw),
                              eval_dataset=lm_data(8))
    hf.state.log_history = xt.state.log_history
    from transformers.modelcard import TrainingSummary

    options = dict(language="en", license="apache-2.0", tags=["my-tag"], dataset="my_data", model_name="tiny",
                   finetuned_from="org/tiny-base")
    theirs = TrainingSummary.from_trainer(hf, **{**options, "tags": ["my-tag"]}).to_model_card()
    xt.create_model_card(**options)
    ours = open(tmp_path / "xt" / "README.md").read()
    cut = "### Framework versions"
    # transformers' f-string prints its optimizer enum's repr ("Use OptimizerNames.ADAMW_TORCH_FUSED"); ours its value
    theirs = theirs.replace("Use OptimizerNames.ADAMW_TORCH_FUSED", "Use adamw_torch_fused")
    assert ours.split(cut)[0] == theirs.split(cut)[0]
    assert "| Training Loss | Epoch | Step | Validation Loss |" in ours and "- xtrainer " in ours.split(cut)[1]
    # Tags of an existing card are kept when the card is written again.
    xt.create_model_card(tags="second")
    metadata = model_card.read_card_metadata(str(tmp_path / "xt" / "README.md"))
    assert metadata["tags"] == ["second", "my-tag", "generated_from_trainer"]


# ------------------------------------------------------------------ accelerate's place, sizes, tokens


def test_accelerator_view_sizes_and_end(tmp_path):
    trainer = xtrainer.Trainer(model=RegressionModel(), args=_xt_args(tmp_path))
    acc = trainer.accelerator
    assert (acc.is_main_process, acc.num_processes, acc.process_index, acc.parallelism_config) == (True, 1, 0, None)
    assert acc.unwrap_model(trainer.model) is trainer.model and acc.gather_for_metrics([1, 2]) == [1, 2]
    assert getattr(acc, "deepspeed_plugin", "absent") == "absent"  # getattr with a default works as with accelerate
    with pytest.raises(AttributeError, match="does not run accelerate"):
        acc.prepare(trainer.model)
    assert (trainer.get_cp_size(), trainer.get_sp_size(), trainer.get_tp_size()) == (1, 1, 1)
    trainer.model._tp_size = 4  # transformers' tensor-parallel loading records its degree on the model
    assert trainer.get_tp_size() == 4
    assert trainer.is_deepspeed_enabled is False
    trainer.end()  # no process group: nothing to shut down, and no error
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", world_size=1, rank=0)
    assert dist.is_initialized()
    trainer.end()  # as accelerate's end_training: the process group is destroyed
    assert not dist.is_initialized()


def test_tensor_parallel_size_is_the_mesh_tensor_axis_on_jax(tmp_path):
    pytest.importorskip("flax")
    from flax import nnx

    from jax_models import RegressionMLP

    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax", mesh={"data": 4, "tensor": 2}, report_to="none")
    trainer = xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=args)
    assert trainer.get_tp_size() == 2 and trainer.accelerator.num_processes == 1
    assert trainer.get_num_trainable_parameters() == 4 * 16 + 16 + 2 * 16 + 16 * 1 + 1  # Linear, LayerNorm, Linear


def test_num_tokens_and_trainable_parameters(tmp_path):
    model = tiny_gpt2()
    model.transformer.wte.weight.requires_grad_(False)
    trainer = xtrainer.Trainer(model=model, args=_xt_args(tmp_path, remove_unused_columns=False), train_dataset=lm_data(12))
    loader = trainer.get_train_dataloader()
    assert trainer.num_tokens(loader) == 12 * 16
    assert xtrainer.Trainer.num_tokens(loader, max_steps=5) == 4 * 16 * 5
    hf = transformers.Trainer(model=model, args=transformers.TrainingArguments(str(tmp_path / "hf"), report_to="none"))
    assert trainer.get_num_trainable_parameters() == hf.get_num_trainable_parameters()
