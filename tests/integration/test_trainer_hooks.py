"""Subclass hooks of transformers' Trainer take effect on every backend, or are refused at Trainer(...).

Each test overrides one hook in a way that must change the result (loss x 0 freezes the weights, a
zero learning rate freezes them, a constant eval loss shows up in the metrics, ...), so a backend that
ignores the override fails it. Backends: torch and jax (a Flax NNX model) in the main lane; torch_xla
and torchax (a torch module on the jax backend) in the XLA lane.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

import xtrainer
from xtrainer.hooks import UnsupportedHookError
from helpers import RegressionModel, regression_data

BACKENDS = ["torch", "jax", "torch_xla", "torchax"]


def _needs(kind: str) -> None:
    if kind == "jax" and importlib.util.find_spec("flax") is None:
        pytest.skip("flax is not installed")
    if kind == "torch_xla" and importlib.util.find_spec("torch_xla") is None:
        pytest.skip("torch_xla runs in the XLA lane")
    if kind == "torchax":
        try:
            import torchax  # noqa: F401
        except Exception:
            pytest.skip("torchax runs in the XLA lane")


def _model_and_data(kind: str, n: int = 32):
    if kind == "jax":
        from flax import nnx

        from jax_models import RegressionMLP, regression_rows

        return RegressionMLP(nnx.Rngs(0)), regression_rows(n)
    return RegressionModel(a=0.5, b=-0.5), regression_data(n)


def _args(tmp_path, kind: str, **kw):
    backend = "jax" if kind == "torchax" else kind
    base = dict(backend=backend, per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=0.05,
                max_steps=3, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                train_sampling_strategy="sequential", seed=0)
    if backend in ("jax", "torch_xla"):  # one example per device: global batches of 8 (jax) and 4 (torch_xla)
        base["per_device_train_batch_size"] = base["per_device_eval_batch_size"] = 1
    base.update(kw)
    return xtrainer.TrainingArguments(str(tmp_path), **base)


def _weights(trainer) -> dict[str, np.ndarray]:
    model = trainer.model
    if isinstance(model, torch.nn.Module):
        return {n: p.detach().cpu().numpy().copy() for n, p in model.named_parameters()}
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model, nnx.Param)) if hasattr(nnx, "to_flat_state") else nnx.state(model, nnx.Param).flat_state()
    return {".".join(map(str, path)): np.asarray(var.get_value() if hasattr(var, "get_value") else var.value).copy()
            for path, var in flat}


def _train(trainer_cls, tmp_path, kind, **kw):
    model, data = _model_and_data(kind)
    trainer_kw = {k: kw.pop(k) for k in ("optimizers", "optimizer_cls_and_kwargs", "eval_dataset") if k in kw}
    trainer = trainer_cls(model=model, args=_args(tmp_path, kind, **kw), train_dataset=data, **trainer_kw)
    before = _weights(trainer)
    trainer.train()
    return trainer, before, _weights(trainer)


def _frozen(before, after) -> bool:
    return all(np.array_equal(before[k], after[k]) for k in before)


def _first_loss(trainer) -> float:
    return next(log["loss"] for log in trainer.state.log_history if "loss" in log)


# ---------------------------------------------------------------- compute_loss


class ZeroLoss(xtrainer.Trainer):
    calls = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        type(self).calls += 1
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        return (loss * 0, outputs) if return_outputs else loss * 0


class DoubleLoss(xtrainer.Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        return (out[0] * 2, out[1]) if return_outputs else out * 2


@pytest.mark.parametrize("kind", BACKENDS)
def test_compute_loss_override_freezes_weights(tmp_path, kind):
    _needs(kind)
    ZeroLoss.calls = 0
    trainer, before, after = _train(ZeroLoss, tmp_path, kind)
    assert ZeroLoss.calls >= 1
    assert _frozen(before, after)
    _, base_before, base_after = _train(xtrainer.Trainer, tmp_path / "base", kind)
    assert not _frozen(base_before, base_after)  # the same run without the override does train


@pytest.mark.parametrize("kind", BACKENDS)
def test_compute_loss_override_changes_train_and_eval_loss(tmp_path, kind):
    _needs(kind)
    trainers = {}
    for cls in (DoubleLoss, xtrainer.Trainer):
        model, data = _model_and_data(kind)
        trainers[cls] = cls(model=model, args=_args(tmp_path / cls.__name__, kind), train_dataset=data,
                            eval_dataset=data[:8])
    # Evaluation goes through compute_loss(return_outputs=True) too, as in transformers.
    doubled_eval, base_eval = (trainers[c].evaluate()["eval_loss"] for c in (DoubleLoss, xtrainer.Trainer))
    assert doubled_eval == pytest.approx(2 * base_eval, rel=1e-5)
    for trainer in trainers.values():
        trainer.train()
    assert _first_loss(trainers[DoubleLoss]) == pytest.approx(2 * _first_loss(trainers[xtrainer.Trainer]), rel=1e-5)


# ---------------------------------------------------------------- training_step


class CountingTrainingStep(xtrainer.Trainer):
    calls: list = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        type(self).calls.append((sorted(inputs), num_items_in_batch is not None))
        return super().training_step(model, inputs, num_items_in_batch)


@pytest.mark.parametrize("kind", ["torch", "torch_xla"])
def test_training_step_override_runs_once_per_micro_batch(tmp_path, kind):
    _needs(kind)
    CountingTrainingStep.calls = []
    trainer, before, after = _train(CountingTrainingStep, tmp_path, kind, gradient_accumulation_steps=2)
    assert len(CountingTrainingStep.calls) == 3 * 2
    assert all(keys == ["input_x", "labels"] for keys, _ in CountingTrainingStep.calls)
    assert not _frozen(before, after)


class NoBackwardTrainingStep(xtrainer.Trainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        return loss.detach()  # no backward: the weights must not move


def test_training_step_override_without_backward_freezes_weights_on_torch(tmp_path):
    _, before, after = _train(NoBackwardTrainingStep, tmp_path, "torch")
    assert _frozen(before, after)


@pytest.mark.parametrize("kind", ["jax", "torchax"])
def test_jax_refuses_hooks_it_cannot_honour(tmp_path, kind):
    _needs(kind)
    model, data = _model_and_data(kind)
    with pytest.raises(UnsupportedHookError, match=r"training_step.*override compute_loss"):
        CountingTrainingStep(model=model, args=_args(tmp_path, kind), train_dataset=data)

    class WithContext(xtrainer.Trainer):
        def compute_loss_context_manager(self):
            return super().compute_loss_context_manager()

    with pytest.raises(UnsupportedHookError, match="compute_loss_context_manager.*bf16=True"):
        WithContext(model=model, args=_args(tmp_path, kind), train_dataset=data)
    with pytest.raises(TypeError, match="optimizer_cls_and_kwargs.*optax"):
        xtrainer.Trainer(model=model, args=_args(tmp_path, kind), train_dataset=data,
                         optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}))


# ---------------------------------------------------------------- prediction_step


class ConstantEvalLoss(xtrainer.Trainer):
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        return loss * 0 + 7.0, logits, labels


@pytest.mark.parametrize("kind", BACKENDS)
def test_prediction_step_override_sets_the_eval_loss(tmp_path, kind):
    _needs(kind)
    model, data = _model_and_data(kind)
    trainer = ConstantEvalLoss(model=model, args=_args(tmp_path, kind), train_dataset=data, eval_dataset=data[:8])
    assert trainer.evaluate()["eval_loss"] == pytest.approx(7.0)
    trainer.train()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(7.0)
    predictions = trainer.predict(data[:8])
    assert predictions.metrics["test_loss"] == pytest.approx(7.0)


# ---------------------------------------------------------------- optimizer and schedule


class ZeroLrSchedule(xtrainer.Trainer):
    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            if self.backend.name == "jax":
                self.lr_scheduler = lambda step: 0.0
            else:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, lambda step: 0.0)
        return self.lr_scheduler


@pytest.mark.parametrize("kind", BACKENDS)
def test_create_scheduler_override_is_used(tmp_path, kind):
    _needs(kind)
    trainer, before, after = _train(ZeroLrSchedule, tmp_path, kind)
    assert _frozen(before, after)
    assert [log["learning_rate"] for log in trainer.state.log_history if "learning_rate" in log] == [0.0] * 3
    if trainer.backend.name == "jax":
        assert trainer.lr_scheduler(0) == 0.0
    else:
        assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.LambdaLR)


class FrozenOptimizer(xtrainer.Trainer):
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            if self.backend.name == "jax":
                import optax

                self.optimizer = optax.set_to_zero()
            else:
                self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.0)
        return self.optimizer


@pytest.mark.parametrize("kind", BACKENDS)
def test_create_optimizer_override_is_used(tmp_path, kind):
    _needs(kind)
    trainer, before, after = _train(FrozenOptimizer, tmp_path, kind)
    assert _frozen(before, after)
    if trainer.backend.name == "jax":
        assert trainer.get_learning_rates() == [pytest.approx(trainer.lr_scheduler(3))]
    else:
        assert isinstance(trainer.optimizer, torch.optim.SGD)
        assert trainer.get_learning_rates() == [0.0]


def test_optimizer_cls_and_kwargs_on_torch(tmp_path):
    trainer, before, after = _train(xtrainer.Trainer, tmp_path, "torch",
                                    optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.0}))
    assert isinstance(trainer.optimizer, torch.optim.SGD) and _frozen(before, after)
    with pytest.raises(RuntimeError, match="either `optimizers` or `optimizer_cls_and_kwargs`"):
        xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path, "torch"),
                         optimizers=(torch.optim.SGD(RegressionModel().parameters(), lr=0.1), None),
                         optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.0}))
    cls, kwargs = xtrainer.Trainer.get_optimizer_cls_and_kwargs(_args(tmp_path, "torch", optim="adamw_torch"))
    assert cls is torch.optim.AdamW and kwargs["lr"] == 0.05 and kwargs["betas"] == (0.9, 0.999)


def test_optax_optimizer_and_schedule_passed_in(tmp_path):
    _needs("jax")
    import optax

    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    schedule = lambda step: 0.05  # noqa: E731
    injected, _, w_injected = _train(xtrainer.Trainer, tmp_path / "a", "jax", optimizers=(sgd, schedule))
    assert injected.optimizer is sgd and injected.lr_scheduler is schedule
    assert [log["learning_rate"] for log in injected.state.log_history if "learning_rate" in log] == [0.05] * 3
    # A fixed-rate optax optimizer with the default (constant) schedule is scaled like LambdaLR: the same run.
    fixed, _, w_fixed = _train(xtrainer.Trainer, tmp_path / "b", "jax", optimizers=(optax.sgd(0.05), None),
                               lr_scheduler_type="constant")
    assert all(np.allclose(w_injected[k], w_fixed[k], atol=1e-7) for k in w_injected)
    model, data = _model_and_data("jax")
    trainer = xtrainer.Trainer(model=model, args=_args(tmp_path / "c", "jax"), train_dataset=data,
                               optimizers=(optax.sgd(0.05), schedule))
    with pytest.raises(ValueError, match="inject_hyperparams"):
        trainer.train()


class NoDecay(xtrainer.Trainer):
    def get_decay_parameter_names(self, model):
        return []


@pytest.mark.parametrize("kind", ["torch", "jax"])
def test_get_decay_parameter_names_override(tmp_path, kind):
    _needs(kind)
    _, _, without = _train(NoDecay, tmp_path / "a", kind, weight_decay=0.5)
    _, _, plain = _train(xtrainer.Trainer, tmp_path / "b", kind, weight_decay=0.0)
    _, _, decayed = _train(xtrainer.Trainer, tmp_path / "c", kind, weight_decay=0.5)
    assert all(np.allclose(without[k], plain[k], atol=1e-7) for k in plain)
    assert not all(np.allclose(decayed[k], plain[k], atol=1e-7) for k in plain)


# ---------------------------------------------------------------- inputs, logging, saving, loading


class ZeroLabels(xtrainer.Trainer):
    calls = 0

    def _prepare_inputs(self, inputs):
        type(self).calls += 1
        inputs = dict(super()._prepare_inputs(inputs))
        inputs["labels"] = inputs["labels"] * 0
        return inputs


@pytest.mark.parametrize("kind", BACKENDS)
def test_prepare_inputs_override_changes_what_the_model_sees(tmp_path, kind):
    _needs(kind)
    ZeroLabels.calls = 0
    zeroed, _, _ = _train(ZeroLabels, tmp_path / "z", kind)
    base, _, _ = _train(xtrainer.Trainer, tmp_path / "b", kind)
    assert ZeroLabels.calls >= 1
    assert abs(_first_loss(zeroed) - _first_loss(base)) > 1e-3


class CountingContext(xtrainer.Trainer):
    entered = 0

    def compute_loss_context_manager(self):
        import contextlib

        type(self).entered += 1
        return contextlib.nullcontext()


def test_compute_loss_context_manager_override_on_torch(tmp_path):
    CountingContext.entered = 0
    _, data = _model_and_data("torch")
    trainer, _, _ = _train(CountingContext, tmp_path, "torch", gradient_accumulation_steps=2, eval_dataset=data[:8])
    assert CountingContext.entered == 6
    trainer.evaluate()
    assert CountingContext.entered == 6 + 2  # one per eval batch of 4


class RecordingLogs(xtrainer.Trainer):
    calls: list = []

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                 learning_rate=None):
        type(self).calls.append((epoch, learning_rate, model is self.model_wrapped))
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                         learning_rate=learning_rate)


@pytest.mark.parametrize("kind", ["torch", "jax"])
def test_maybe_log_save_evaluate_override(tmp_path, kind):
    _needs(kind)
    RecordingLogs.calls = []
    trainer, _, _ = _train(RecordingLogs, tmp_path, kind)
    assert len(RecordingLogs.calls) == 3 + 1  # every step, and the end of the epoch
    assert all(model_ok for _, _, model_ok in RecordingLogs.calls)
    assert RecordingLogs.calls[0][1] == pytest.approx(0.05)  # learning rate of the first step (linear decay)
    assert sum("loss" in log for log in trainer.state.log_history) == 3


class ExtraFileOnSave(xtrainer.Trainer):
    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        with open(os.path.join(output_dir, "extra.txt"), "w") as f:
            f.write(str(self.state.global_step))


class RecordingLoad(xtrainer.Trainer):
    loaded: list = []

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        type(self).loaded.append(os.path.basename(resume_from_checkpoint))
        super()._load_from_checkpoint(resume_from_checkpoint, model)


@pytest.mark.parametrize("kind", ["torch", "jax"])
def test_save_and_load_hooks(tmp_path, kind):
    _needs(kind)

    class Both(ExtraFileOnSave, RecordingLoad):
        pass

    RecordingLoad.loaded = []
    trainer, _, _ = _train(Both, tmp_path, kind, save_strategy="steps", save_steps=2, max_steps=4)
    with open(tmp_path / "checkpoint-2" / "extra.txt") as f:
        assert f.read() == "2"  # checkpoints go through _save, as in transformers
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "extra.txt").read_text() == "4"
    model, data = _model_and_data(kind)
    resumed = Both(model=model, args=_args(tmp_path, kind, save_strategy="steps", save_steps=2, max_steps=4),
                   train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert RecordingLoad.loaded == ["checkpoint-2"]
    assert resumed.state.global_step == 4


class CountingBatches(xtrainer.Trainer):
    asked: list = []

    def get_batch_samples(self, epoch_iterator, num_batches, device=None):
        type(self).asked.append(num_batches)
        return super().get_batch_samples(epoch_iterator, num_batches, device)


def test_get_batch_samples_override(tmp_path):
    CountingBatches.asked = []
    _train(CountingBatches, tmp_path, "torch", gradient_accumulation_steps=2)
    # Every window comes from the override; the loop places the next window while a step runs, so the window
    # after the last step may be asked for too (it is not trained on).
    assert CountingBatches.asked[:3] == [2, 2, 2] and len(CountingBatches.asked) <= 4


class ManualCausalLoss(xtrainer.Trainer):
    """An ordinary transformers-style override: pop the labels, call the model, cross entropy in torch."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        return (loss, outputs) if return_outputs else loss


@pytest.mark.parametrize("kind", ["torchax"])
def test_torch_style_compute_loss_runs_unchanged_on_torchax(tmp_path, kind):
    """The same torch override trains a GPT-2 on jax (traced through torchax) as on the torch backend."""
    _needs(kind)
    from helpers import lm_data, tiny_gpt2

    histories = {}
    for name, backend in (("torchax", "jax"), ("torch", "torch")):
        args = xtrainer.TrainingArguments(
            str(tmp_path / name), backend=backend, per_device_train_batch_size=1 if backend == "jax" else 8,
            per_device_eval_batch_size=1 if backend == "jax" else 8, max_steps=4, logging_steps=1, learning_rate=1e-2,
            save_strategy="no", report_to="none", disable_tqdm=True, train_sampling_strategy="sequential", seed=0)
        data = lm_data(32)
        trainer = ManualCausalLoss(model=tiny_gpt2(), args=args, train_dataset=data, eval_dataset=data[:8])
        trainer.train()
        histories[name] = ([log["loss"] for log in trainer.state.log_history if "loss" in log],
                           trainer.evaluate()["eval_loss"])
    np.testing.assert_allclose(histories["torchax"][0], histories["torch"][0], rtol=1e-4)
    assert histories["torchax"][1] == pytest.approx(histories["torch"][1], rel=1e-4)
