"""The bad-input matrix: every bad input gets a clear error from xtrainer's own code.

Each case asserts the exception type, that the message names the argument or data field and says
how to fix it, and that the exception is raised by a frame under xtrainer/ (a library error may be
chained underneath, with xtrainer's message on top), so the user never reads a traceback from deep
inside jax, torch or orbax first.
"""

import os
import re

import numpy as np
import pytest
import torch
from torch import nn

import xtrainer
from helpers import RegressionModel, regression_data
from jax_models import LogitsOnlyClassifier, RegressionMLP, classification_rows, regression_rows

XTRAINER_DIR = os.path.dirname(os.path.abspath(xtrainer.__file__))
QUIET = dict(report_to="none", disable_tqdm=True)


def assert_clear(excinfo, *patterns):
    """The message matches every pattern (case-insensitive) and the raising frame is xtrainer's."""
    message = str(excinfo.value)
    for pattern in patterns:
        assert re.search(pattern, message, flags=re.I | re.S), (pattern, message)
    frames = excinfo.traceback
    raiser = os.path.abspath(str(frames[-1].path))
    assert raiser.startswith(XTRAINER_DIR), f"raised from {raiser}, not from xtrainer: {message}"


def args(tmp_path, **kw):
    return xtrainer.TrainingArguments(str(tmp_path), **{**QUIET, **kw})


def torch_trainer(tmp_path, data=None, model=None, **kw):
    return xtrainer.Trainer(model=model or RegressionModel(), args=args(tmp_path, backend="torch", **kw),
                            train_dataset=regression_data(16) if data is None else data)


def jax_model(kind="regression"):
    from flax import nnx

    return RegressionMLP(nnx.Rngs(0)) if kind == "regression" else LogitsOnlyClassifier(nnx.Rngs(0))


def jax_trainer(tmp_path, data=None, model=None, **kw):
    kw.setdefault("per_device_train_batch_size", 1)
    return xtrainer.Trainer(model=model or jax_model(), args=args(tmp_path, backend="jax", **kw),
                            train_dataset=regression_rows(16) if data is None else data)


def trainer_for(backend, tmp_path, data_torch=None, data_jax=None, **kw):
    if backend == "torch":
        return torch_trainer(tmp_path, data_torch, **kw)
    return jax_trainer(tmp_path, data_jax, **kw)


BACKENDS = ["torch", "jax"]

# ---------------------------------------------------------------- arguments (backend-neutral)

ARG_CASES = {
    "unknown_backend": (dict(backend="tpu"), ValueError, [r"`backend`='tpu'", r"choose one of: auto, jax, torch, torch_xla"]),
    "unknown_optimizer": (dict(optim="adamw_foo"), ValueError, [r"`optim`='adamw_foo'", r"choose one of: .*'adamw_torch'"]),
    "unknown_lr_scheduler": (dict(lr_scheduler_type="wavy"), ValueError, [r"`lr_scheduler_type`='wavy'", r"choose one of: .*'cosine'"]),
    "negative_max_steps": (dict(max_steps=-5), ValueError, [r"`max_steps`", r"non-negative integer or -1"]),
    "bf16_and_fp16": (dict(bf16=True, fp16=True), ValueError, [r"`fp16` and `bf16`", r"pick one"]),
    "per_device_batch_zero": (dict(per_device_train_batch_size=0), ValueError, [r"`per_device_train_batch_size`", r">= 1"]),
    "grad_accumulation_zero": (dict(gradient_accumulation_steps=0), ValueError, [r"`gradient_accumulation_steps`", r">= 1"]),
    "negative_warmup": (dict(warmup_steps=-1), ValueError, [r"`warmup_steps`", r">= 0"]),
    "best_model_mismatched_strategies": (
        dict(load_best_model_at_end=True, eval_strategy="epoch", save_strategy="steps"), ValueError,
        [r"`load_best_model_at_end`", r"eval_strategy='epoch'", r"save_strategy='steps'", r"match"]),
    "save_best_without_metric": (dict(save_strategy="best", eval_strategy="steps"), ValueError,
                                 [r"save_strategy='best'", r"`metric_for_best_model`"]),
    "plateau_without_eval": (dict(lr_scheduler_type="reduce_lr_on_plateau"), ValueError,
                             [r"reduce_lr_on_plateau", r"`eval_strategy`"]),
    "prefetch_without_workers": (dict(dataloader_prefetch_factor=2), ValueError,
                                 [r"`dataloader_prefetch_factor`", r"`dataloader_num_workers` > 0"]),
    "unknown_nan_policy": (dict(nan_policy="stop"), ValueError, [r"`nan_policy`='stop'", r"'raise', 'skip', 'ignore'"]),
    "mesh_unknown_axis": (dict(mesh={"pipe": 2}), ValueError, [r"`mesh`.*unknown axes \['pipe'\]", r"allowed axes"]),
    "mesh_two_free_axes": (dict(mesh={"data": -1, "fsdp": -1}), ValueError, [r"`mesh`", r"-1 for at most one axis"]),
    "unknown_tpu_preset": (dict(tpu_config="v9z-1"), ValueError, [r"v9z-1", r"v5e|v4|v5p"]),
    "bad_include_for_metrics": (dict(include_for_metrics=["logits"]), ValueError, [r"`include_for_metrics`", r"'inputs' and 'loss'"]),
    "bad_log_level": (dict(log_level="loud"), ValueError, [r"`log_level`='loud'", r"choose one of"]),
}


@pytest.mark.parametrize("case", sorted(ARG_CASES))
def test_bad_arguments(tmp_path, case):
    kwargs, error, patterns = ARG_CASES[case]
    with pytest.raises(error) as info:
        args(tmp_path, **kwargs)
    assert_clear(info, *patterns)


# ---------------------------------------------------------------- trainer construction and data


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_strategy_without_eval_dataset(tmp_path, backend):
    with pytest.raises(ValueError) as info:
        trainer_for(backend, tmp_path, eval_strategy="steps", eval_steps=1)
    assert_clear(info, r"eval_strategy='steps'", r"eval_dataset")


def test_backend_not_installed(tmp_path, monkeypatch):
    from xtrainer.backends import registry

    monkeypatch.setattr(registry, "_importable", lambda module: module not in ("jax", "flax"))
    with pytest.raises((ValueError, ImportError)) as info:
        jax_trainer(tmp_path)
    assert_clear(info, r"backend='jax'", r"pip install")


def test_unknown_sharding_rule_axis(tmp_path):
    with pytest.raises(ValueError) as info:
        jax_trainer(tmp_path, sharding_rules=[["l1.kernel", ["model", None]]])
    assert_clear(info, r"Sharding rule 'l1.kernel'", r"unknown mesh axis 'model'", r"axes:")


def test_mesh_not_matching_devices(tmp_path):
    with pytest.raises(ValueError) as info:
        jax_trainer(tmp_path, mesh={"data": 3})
    assert_clear(info, r"mesh \{'data': 3\}", r"8 are present", r"use -1")


def test_model_and_model_init(tmp_path):
    with pytest.raises(ValueError) as info:
        xtrainer.Trainer(model=RegressionModel(), model_init=RegressionModel, args=args(tmp_path))
    assert_clear(info, r"either a `model` or a `model_init`")


def test_model_init_with_optimizers(tmp_path):
    model = RegressionModel()
    with pytest.raises(RuntimeError) as info:
        xtrainer.Trainer(model_init=lambda: RegressionModel(), args=args(tmp_path),
                         optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    assert_clear(info, r"`model_init` cannot be combined with `optimizers`", r"Subclass Trainer")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_feature(tmp_path, backend):
    data_torch = [{"input_x": [1.0] * (1 + i % 2), "labels": 1.0} for i in range(8)]
    data_jax = [{"x": np.ones(3 + i % 2, np.float32), "labels": 1.0} for i in range(16)]
    with pytest.raises(ValueError) as info:
        trainer_for(backend, tmp_path, data_torch, data_jax, max_steps=1).train()
    assert_clear(info, r"feature '(input_x|x)'", r"different shapes", r"DataCollatorWithPadding")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dataset_shorter_than_one_batch_with_drop_last(tmp_path, backend):
    with pytest.raises(ValueError) as info:
        trainer_for(backend, tmp_path, regression_data(3), regression_rows(3), dataloader_drop_last=True,
                    per_device_train_batch_size=4).train()
    assert_clear(info, r"3 examples, fewer than one batch", r"dataloader_drop_last=False")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_dataset(tmp_path, backend):
    with pytest.raises(ValueError) as info:
        trainer_for(backend, tmp_path, [], [], max_steps=1).train()
    assert_clear(info, r"dataset is empty")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_without_max_steps(tmp_path, backend):
    stream_torch = iter(regression_data(8))
    stream_jax = iter(regression_rows(8))
    with pytest.raises(ValueError) as info:
        trainer_for(backend, tmp_path, stream_torch, stream_jax).train()
    assert_clear(info, r"no length", r"set max_steps")


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_dir_is_a_file(tmp_path, backend):
    path = tmp_path / "file"
    path.write_text("not a directory")
    with pytest.raises(NotADirectoryError) as info:
        trainer_for(backend, path, max_steps=1).train()
    assert_clear(info, r"output_dir=.*file", r"directory path")


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_output_dir(tmp_path, backend, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        if os.access(out, os.W_OK):  # root ignores the mode bits: simulate a read-only mount instead
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **k: False if os.fspath(p) == str(out) else real(p, mode, **k))
        with pytest.raises(PermissionError) as info:
            trainer_for(backend, out, max_steps=1).train()
        assert_clear(info, r"output_dir=.*ro", r"not writable", r"choose a writable")
    finally:
        out.chmod(0o700)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_path_missing(tmp_path, backend):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        trainer_for(backend, tmp_path, max_steps=1).train(resume_from_checkpoint=str(tmp_path / "checkpoint-9"))
    assert_clear(info, r"checkpoint-9")


def test_missing_input_column(tmp_path):
    from helpers import tiny_gpt2

    data = [{"ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]} for _ in range(8)]
    with pytest.raises(ValueError) as info:
        xtrainer.Trainer(model=tiny_gpt2(), args=args(tmp_path, backend="torch", max_steps=1), train_dataset=data).train()
    assert_clear(info, r"'ids'", r"input_ids", r"remove_unused_columns=False|rename")


def test_string_features_not_tokenised(tmp_path):
    from helpers import tiny_gpt2

    data = [{"input_ids": "the cat sat", "labels": [1, 2, 3]} for _ in range(8)]
    with pytest.raises(ValueError) as info:
        xtrainer.Trainer(model=tiny_gpt2(), args=args(tmp_path, backend="torch", max_steps=1), train_dataset=data).train()
    assert_clear(info, r"feature 'input_ids'", r"strings", r"tokeni[sz]e")


def test_float_token_ids(tmp_path):
    from helpers import tiny_gpt2

    data = [{"input_ids": [1.0, 2.0, 3.0], "labels": [1, 2, 3]} for _ in range(8)]
    with pytest.raises(ValueError) as info:
        xtrainer.Trainer(model=tiny_gpt2(), args=args(tmp_path, backend="torch", max_steps=1), train_dataset=data).train()
    assert_clear(info, r"feature 'input_ids'", r"float", r"integer")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_types_in_a_feature(tmp_path, backend):
    data_torch = [{"input_x": 1.0 if i % 2 else None, "labels": 1.0} for i in range(8)]
    data_torch[0]["input_x"] = 1.0
    data_torch[1]["input_x"] = "one"
    data_jax = [{"x": np.ones(4, np.float32), "labels": 1.0} for _ in range(16)]
    data_jax[1]["x"] = "ones"
    with pytest.raises((ValueError, TypeError)) as info:
        trainer_for(backend, tmp_path, data_torch, data_jax, max_steps=1).train()
    assert_clear(info, r"feature '(input_x|x)'", r"example")


def test_float_labels_for_a_classifier(tmp_path):
    data = [{"x": row["x"], "labels": float(row["labels"])} for row in classification_rows(16)]
    with pytest.raises(ValueError) as info:
        jax_trainer(tmp_path, data, model=jax_model("classifier"), max_steps=1).train()
    assert_clear(info, r"`labels`", r"float", r"integer class ids|cast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_under_a_name_the_model_does_not_take(tmp_path, backend):
    data_torch = [{"input_x": float(i), "target": 1.0} for i in range(8)]
    data_jax = [{"x": np.ones(4, np.float32), "target": 1} for _ in range(16)]
    model = jax_model("classifier") if backend == "jax" else None
    with pytest.raises(ValueError) as info:
        trainer_for(backend, tmp_path, data_torch, data_jax, max_steps=1, **({"model": model} if model else {})).train()
    assert_clear(info, r"labels", r"label_names|compute_loss_func|labels column")


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_from_a_different_model(tmp_path, backend):
    if backend == "torch":
        first = torch_trainer(tmp_path, max_steps=2, save_steps=2)
        first.train()

        class Wider(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = nn.Parameter(torch.zeros(3))
                self.b = nn.Parameter(torch.zeros(()))

            def forward(self, input_x, labels=None):
                y = input_x * self.a.sum() + self.b
                return (nn.functional.mse_loss(y, labels), y)

        second = torch_trainer(tmp_path, model=Wider(), max_steps=4, save_steps=2)
    else:
        from flax import nnx

        first = jax_trainer(tmp_path, max_steps=2, save_steps=2)
        first.train()
        second = jax_trainer(tmp_path, model=RegressionMLP(nnx.Rngs(0), hidden=8), max_steps=4, save_steps=2)
    with pytest.raises(ValueError) as info:
        second.train(resume_from_checkpoint=True)
    assert_clear(info, r"checkpoint-2", r"\ba\b|l1", r"shape", r"different model|architecture")
