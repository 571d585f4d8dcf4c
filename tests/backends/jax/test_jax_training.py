"""The JAX backend end to end: model kinds, losses, accumulation, precision, optimizers, no host sync."""

import copy

import jax
import numpy as np
import pytest
from flax import nnx

import xtrainer
from jax_models import (
    LogitsOnlyClassifier,
    RegressionMLP,
    classification_rows,
    functional_regressor,
    linen_regressor,
    regression_rows,
)
from xtrainer import FunctionalModel, LinenModel

BASE = dict(backend="jax", per_device_train_batch_size=1, logging_steps=1, save_strategy="no", report_to="none",
            disable_tqdm=True, learning_rate=0.02, train_sampling_strategy="sequential")


def _train(model, data, tmp_path, **kw):
    trainer = xtrainer.Trainer(model=model, args=xtrainer.TrainingArguments(str(tmp_path), **{**BASE, **kw}),
                               train_dataset=data)
    trainer.train()
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_auto_picks_jax_for_flax_models(tmp_path):
    trainer = xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=xtrainer.TrainingArguments(str(tmp_path)))
    assert trainer.backend.name == "jax"
    assert trainer.backend.local_batch_devices == 8  # all fake devices on the data axis


@pytest.mark.parametrize("kind", ["nnx", "nnx_logits", "linen", "functional"])
def test_every_model_kind_learns_and_is_updated_in_place(tmp_path, kind):
    if kind == "nnx":
        model, data = RegressionMLP(nnx.Rngs(0)), regression_rows()
    elif kind == "nnx_logits":
        model, data = LogitsOnlyClassifier(nnx.Rngs(0)), classification_rows()
    elif kind == "linen":
        model, data = LinenModel(*linen_regressor()), regression_rows()
    else:
        init_fn, apply_fn = functional_regressor()
        model, data = FunctionalModel(init_fn, apply_fn, params=init_fn(jax.random.PRNGKey(0))), regression_rows()
    before = jax.tree.map(np.asarray, jax.tree.leaves(nnx.state(model, nnx.Param) if kind.startswith("nnx") else
                                                      (model.variables if kind == "linen" else model.params)))
    trainer, losses = _train(model, data, tmp_path, max_steps=24, learning_rate=0.2 if kind == "functional" else 0.05)
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])  # each 8 steps is one pass over the data
    after = jax.tree.leaves(nnx.state(model, nnx.Param) if kind.startswith("nnx") else
                            (model.variables if kind == "linen" else model.params))
    assert any(not np.allclose(a, b) for a, b in zip(before, after))  # the user's object holds trained weights
    assert trainer.model is model


def test_gradient_accumulation_equals_bigger_batch(tmp_path):
    data = classification_rows(64)
    base = LogitsOnlyClassifier(nnx.Rngs(1))
    _, big = _train(copy.deepcopy(base), data, tmp_path / "a", max_steps=4, per_device_train_batch_size=2)
    _, acc = _train(copy.deepcopy(base), data, tmp_path / "b", max_steps=4, per_device_train_batch_size=1,
                    gradient_accumulation_steps=2)
    np.testing.assert_allclose(acc, big, rtol=1e-5)


def test_short_last_window_is_padded_without_recompiling(tmp_path, recwarn):
    # 40 rows / 8 per micro-batch = 5 micro-batches per epoch: windows of 2, 2 and a short 1.
    trainer, losses = _train(LogitsOnlyClassifier(nnx.Rngs(0)), classification_rows(40), tmp_path,
                             num_train_epochs=2, gradient_accumulation_steps=2)
    assert trainer.state.global_step == 6 and all(np.isfinite(losses))
    assert len(trainer.backend.compile_seconds) == 1
    assert not [w for w in recwarn if "Recompiling" in str(w.message)]


def test_changed_batch_shape_warns_with_the_reason(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"Recompiling the JAX train step.*'x' \(1, 8, 4\) -> \(1, 4, 4\)"):
        trainer, _ = _train(RegressionMLP(nnx.Rngs(0)), regression_rows(20), tmp_path, num_train_epochs=1)
    assert len(trainer.backend.compile_seconds) == 2


def test_dropout_rng_is_threaded_and_reproducible(tmp_path):
    data = regression_rows()
    _, a = _train(RegressionMLP(nnx.Rngs(0, dropout=1), dropout=0.3), data, tmp_path / "a", max_steps=6)
    _, b = _train(RegressionMLP(nnx.Rngs(0, dropout=1), dropout=0.3), data, tmp_path / "b", max_steps=6)
    _, c = _train(RegressionMLP(nnx.Rngs(0, dropout=1), dropout=0.0), data, tmp_path / "c", max_steps=6)
    assert a == b  # same seeds: same dropout masks
    assert a != c  # dropout is really applied in training


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_master_weights(tmp_path, precision):
    model = RegressionMLP(nnx.Rngs(0))
    trainer, losses = _train(model, regression_rows(), tmp_path, max_steps=16, learning_rate=0.05, **{precision: True})
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert np.mean(losses[8:]) < np.mean(losses[:8])  # second pass over the data beats the first


def test_remat_gives_the_same_losses(tmp_path):
    base = RegressionMLP(nnx.Rngs(0))
    _, plain = _train(copy.deepcopy(base), regression_rows(), tmp_path / "a", max_steps=4)
    _, remat = _train(copy.deepcopy(base), regression_rows(), tmp_path / "b", max_steps=4, activation_checkpointing=True)
    np.testing.assert_allclose(remat, plain, rtol=1e-6)


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd", "adafactor", "adagrad", "rmsprop", "lion_32bit"])
def test_every_optimizer_reduces_the_loss(tmp_path, optim):
    lr = {"lion_32bit": 0.005, "adafactor": 0.05}.get(optim, 0.05)
    _, losses = _train(RegressionMLP(nnx.Rngs(0)), regression_rows(), tmp_path, max_steps=16, optim=optim,
                       learning_rate=lr, lr_scheduler_type="constant")
    assert np.mean(losses[8:]) < np.mean(losses[:8])


def test_weight_decay_mask_skips_biases_and_norms():
    from xtrainer.backends.jax.optim import decay_mask

    params = nnx.state(RegressionMLP(nnx.Rngs(0)), nnx.Param)
    flat = {"/".join(map(str, p)): m for p, m in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
    decayed = sorted(k for k, v in flat.items() if v)
    assert all("kernel" in k for k in decayed) and len(decayed) == 2, decayed


def test_learning_rates_follow_the_shared_schedule(tmp_path):
    trainer, _ = _train(RegressionMLP(nnx.Rngs(0)), regression_rows(), tmp_path, max_steps=6,
                        lr_scheduler_type="cosine", warmup_steps=2)
    from xtrainer.schedules import build_schedule

    expected = [0.02 * build_schedule("cosine", num_training_steps=6, num_warmup_steps=2)(s) for s in range(6)]
    got = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


class _HostReadGuard:
    """Fails any read of a jax.Array's value (or a wait on it) while active.

    jax.transfer_guard does not fire on the CPU backend (device memory is host memory), so the test
    guards the one place every host read goes through: ArrayImpl._value (used by __array__,
    __float__, item(), device_get) plus block_until_ready.
    """

    def __init__(self, monkeypatch):
        from jax._src.array import ArrayImpl

        self.active = False
        self.violations = []
        original_value = ArrayImpl._value
        original_block = ArrayImpl.block_until_ready
        guard = self

        def value(array):
            if guard.active:
                guard.violations.append("value read")
                raise RuntimeError("host read of a device array inside the hot loop")
            return original_value.fget(array)

        def block(array):
            if guard.active:
                guard.violations.append("block_until_ready")
            return original_block(array)

        monkeypatch.setattr(ArrayImpl, "_value", property(value))
        monkeypatch.setattr(ArrayImpl, "block_until_ready", block)


def test_no_host_sync_between_logs(tmp_path, monkeypatch):
    """Steps between two logs never read or wait on device values."""
    guard = _HostReadGuard(monkeypatch)
    guarded = []

    class GuardSteps(xtrainer.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            guard.active = True  # logs are written after on_step_end, outside the guarded span

        def on_step_end(self, args, state, control, **kwargs):
            if guard.active:
                guarded.append(state.global_step)
            guard.active = False

    args = xtrainer.TrainingArguments(str(tmp_path), **{**BASE, "logging_steps": 4, "max_steps": 12})
    trainer = xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=args, train_dataset=regression_rows(),
                               callbacks=[GuardSteps()])
    trainer.train()
    assert guard.violations == []
    assert guarded == list(range(1, 13))
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [4, 8, 12]
    guard.active = True  # and the guard does catch a host read
    with pytest.raises(RuntimeError, match="host read"):
        float(trainer._backend_state["step"])
    guard.active = False


def test_evaluate_and_predict_with_metrics(tmp_path):
    def accuracy(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    data = classification_rows(64)
    args = xtrainer.TrainingArguments(str(tmp_path), **{**BASE, "per_device_eval_batch_size": 1, "max_steps": 40,
                                                         "learning_rate": 0.05})
    trainer = xtrainer.Trainer(model=LogitsOnlyClassifier(nnx.Rngs(0)), args=args, train_dataset=data,
                               eval_dataset=data[:20], compute_metrics=accuracy)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"] and after["eval_accuracy"] > 0.6
    pred = trainer.predict(data[:20])
    assert pred.predictions.shape == (20, 3) and pred.label_ids.shape == (20,)
    assert pred.metrics["test_accuracy"] == pytest.approx(after["eval_accuracy"])
