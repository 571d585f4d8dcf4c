"""nan_policy on every backend: NaN/inf injected at a chosen step through the batch.

skip   -> the bad step's update is not applied (weights equal a run without that batch), the skip
          count is logged, no NaN in the weights, and no host sync is added to the step.
raise  -> the error names the step and the metric (loss or grad_norm); the weights stay clean.
ignore -> NaN reaches the weights.
"""

import importlib.util

import numpy as np
import pytest

HAS_XLA = importlib.util.find_spec("torch_xla") is not None  # its runtime is started by tests/conftest.py

import torch  # noqa: E402
from torch import nn  # noqa: E402

import xtrainer  # noqa: E402
from xtrainer.nan_policy import NonFiniteTrainingError  # noqa: E402

BAD_STEP = 3  # 1-based global step whose batch is poisoned
ARGS = dict(report_to="none", disable_tqdm=True, train_sampling_strategy="sequential", learning_rate=0.1,
            lr_scheduler_type="constant", save_strategy="no", logging_steps=1, seed=0)


class PoisonableRegression(nn.Module):
    """y = a*x + b with an MSE loss. A `poison` of 1 in the batch makes the gradient NaN while the
    loss stays finite (d sqrt(u)/du at u=0 is inf, times 0)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))
        self.b = nn.Parameter(torch.tensor(0.0))

    def forward(self, input_x, labels=None, poison=None):
        y = input_x * self.a + self.b
        loss = nn.functional.mse_loss(y, labels)
        if poison is not None:
            loss = loss + torch.sqrt(self.a * 0 + 1 - poison.max()) * 0
        return loss, y


def rows(n, batch, bad_step=None, kind="nan_input", slope=2.0, offset=1.0):
    rng = np.random.default_rng(0)
    x = rng.normal(size=n).astype(np.float32)
    out = [{"input_x": float(v), "labels": float(slope * v + offset), "poison": 0.0} for v in x]
    if bad_step is not None:
        i = (bad_step - 1) * batch
        if kind == "nan_input":
            out[i]["input_x"] = float("nan")
        else:
            out[i]["poison"] = 1.0
    return out


def drop_batch(data, batch, step):
    return data[: (step - 1) * batch] + data[step * batch:]


# ---------------------------------------------------------------- torch / torch_xla


def torch_run(tmp_path, data, batch=4, steps=4, backend="torch", **kw):
    torch.manual_seed(0)
    model = PoisonableRegression()
    args = xtrainer.TrainingArguments(str(tmp_path), backend=backend, per_device_train_batch_size=batch,
                                      max_steps=steps, **{**ARGS, **kw})
    trainer = xtrainer.Trainer(model=model, args=args, train_dataset=data)
    return trainer


def torch_weights(trainer):
    return np.array([trainer.model.a.item(), trainer.model.b.item()])


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch", "sgd"])
def test_torch_skip_equals_run_without_the_bad_batch(tmp_path, optim):
    data = rows(16, 4, BAD_STEP)
    skipped = torch_run(tmp_path / "a", data, nan_policy="skip", optim=optim)
    skipped.train()
    reference = torch_run(tmp_path / "b", drop_batch(data, 4, BAD_STEP), steps=3, optim=optim)
    reference.train()
    assert np.all(np.isfinite(torch_weights(skipped)))
    np.testing.assert_allclose(torch_weights(skipped), torch_weights(reference), rtol=1e-6, atol=1e-7)
    counts = [h["nan_skipped_steps"] for h in skipped.state.log_history if "loss" in h]
    assert counts == [0, 0, 1, 1]
    assert skipped.state.global_step == 4


@pytest.mark.parametrize("kind,metric", [("nan_input", "loss"), ("poison", "grad_norm")])
def test_torch_raise_names_step_and_metric(tmp_path, kind, metric):
    trainer = torch_run(tmp_path / "a", rows(16, 4, BAD_STEP, kind), nan_policy="raise", logging_steps=2)
    with pytest.raises(NonFiniteTrainingError, match=rf"Non-finite {metric} .* at step {BAD_STEP};.*nan_policy='skip'") as info:
        trainer.train()
    assert isinstance(info.value, FloatingPointError) and info.value.step == BAD_STEP
    assert trainer.state.global_step == 4  # logging_steps=2: found at the next log
    before = torch_run(tmp_path / "b", rows(16, 4), steps=BAD_STEP - 1)
    before.train()
    np.testing.assert_allclose(torch_weights(trainer), torch_weights(before), rtol=1e-6)


def test_torch_ignore_lets_nan_into_the_weights(tmp_path):
    trainer = torch_run(tmp_path, rows(16, 4, BAD_STEP), nan_policy="ignore")
    trainer.train()
    assert np.isnan(torch_weights(trainer)).all()


def test_torch_skip_adds_no_host_sync(tmp_path, monkeypatch):
    trainer = torch_run(tmp_path, rows(16, 4, BAD_STEP), nan_policy="skip")
    step = trainer.backend.train_step
    inside = {"now": False}

    def forbidden(name, original):
        def wrapper(self, *a, **k):
            if inside["now"]:
                raise AssertionError(f"Tensor.{name} called inside train_step")
            return original(self, *a, **k)
        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name, getattr(torch.Tensor, name)))

    def watched(*a, **k):
        inside["now"] = True
        try:
            return step(*a, **k)
        finally:
            inside["now"] = False

    trainer.backend.train_step = watched
    trainer.train()
    monkeypatch.undo()
    assert [h["nan_skipped_steps"] for h in trainer.state.log_history if "loss" in h] == [0, 0, 1, 1]


@pytest.mark.skipif(not HAS_XLA, reason="torch_xla is not installed (the XLA lane runs this)")
def test_torch_xla_skip_and_raise(tmp_path):
    data = rows(16, 4, BAD_STEP)
    # 1 per device x 4 devices. SGD: torch's non-fused Adam keeps its step count on the host, which the
    # device-side skip cannot rewind without a sync (documented), so Adam would differ in bias correction.
    kw = dict(backend="torch_xla", batch=1, mesh={"data": 4}, optim="sgd")
    skipped = torch_run(tmp_path / "a", data, nan_policy="skip", **kw)
    skipped.train()
    reference = torch_run(tmp_path / "b", drop_batch(data, 4, BAD_STEP), steps=3, **kw)
    reference.train()
    assert np.all(np.isfinite(torch_weights(skipped)))
    np.testing.assert_allclose(torch_weights(skipped), torch_weights(reference), rtol=1e-5)
    assert [h["nan_skipped_steps"] for h in skipped.state.log_history if "loss" in h] == [0, 0, 1, 1]
    raising = torch_run(tmp_path / "c", rows(16, 4, BAD_STEP, "poison"), nan_policy="raise", **kw)
    with pytest.raises(NonFiniteTrainingError, match=f"grad_norm .* at step {BAD_STEP}"):
        raising.train()


# ---------------------------------------------------------------- jax


def jax_run(tmp_path, data, steps=4, **kw):
    from flax import nnx
    import jax.numpy as jnp

    class Regression(nnx.Module):
        def __init__(self):
            self.a = nnx.Param(jnp.float32(0.5))
            self.b = nnx.Param(jnp.float32(0.0))

        def __call__(self, input_x, labels, poison=None):
            y = input_x * self.a + self.b
            loss = jnp.mean((y - labels) ** 2)
            if poison is not None:
                loss = loss + jnp.sqrt(self.a * 0 + 1 - poison.max()) * 0
            return {"loss": loss, "logits": y}

    # 8 fake devices x 1 example = batches of 8.
    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax", per_device_train_batch_size=1, max_steps=steps,
                                      **{**ARGS, **kw})
    return xtrainer.Trainer(model=Regression(), args=args, train_dataset=data)


def jax_weights(trainer):
    return np.array([float(trainer.model.a[...]), float(trainer.model.b[...])])


def test_jax_skip_equals_run_without_the_bad_batch_with_no_host_sync(tmp_path):
    import jax

    data = rows(32, 8, BAD_STEP)
    skipped = jax_run(tmp_path / "a", data, nan_policy="skip", logging_steps=100)
    reads = []
    to_host = skipped.backend.to_host
    skipped.backend.to_host = lambda tree: reads.append(tree) or to_host(tree)
    step = skipped.backend.train_step
    metrics_seen = []

    def recording(*a):
        state, metrics = step(*a)
        metrics_seen.append(metrics)
        return state, metrics

    skipped.backend.train_step = recording
    skipped.train()
    # No log before the end: the only device reads are the end-of-training ones (loss drain + nan check).
    assert len(reads) == 2
    assert all(isinstance(m.loss, jax.Array) and isinstance(m.nonfinite["skipped"], jax.Array) for m in metrics_seen)
    assert len(skipped.backend._compiled) == 1  # one compiled program for every step, skipped or not
    assert int(jax.device_get(metrics_seen[-1].nonfinite["skipped"])) == 1
    reference = jax_run(tmp_path / "b", drop_batch(data, 8, BAD_STEP), steps=3)
    reference.train()
    assert np.all(np.isfinite(jax_weights(skipped)))
    np.testing.assert_allclose(jax_weights(skipped), jax_weights(reference), rtol=1e-6, atol=1e-7)


def test_jax_skip_logs_count_and_raise_names_step(tmp_path):
    skipped = jax_run(tmp_path / "a", rows(32, 8, BAD_STEP), nan_policy="skip")
    skipped.train()
    assert [h["nan_skipped_steps"] for h in skipped.state.log_history if "loss" in h] == [0, 0, 1, 1]
    raising = jax_run(tmp_path / "b", rows(32, 8, BAD_STEP, "poison"), nan_policy="raise")
    with pytest.raises(NonFiniteTrainingError, match=f"Non-finite grad_norm .* at step {BAD_STEP}"):
        raising.train()
    clean = jax_run(tmp_path / "c", rows(32, 8), steps=BAD_STEP - 1)
    clean.train()
    np.testing.assert_allclose(jax_weights(raising), jax_weights(clean), rtol=1e-6)


def test_jax_ignore_lets_nan_into_the_weights(tmp_path):
    trainer = jax_run(tmp_path, rows(32, 8, BAD_STEP))
    trainer.train()
    assert np.isnan(jax_weights(trainer)).all()


def test_bad_policy_value_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"`nan_policy`='stop' is not supported; choose one of: 'raise', 'skip', 'ignore'"):
        xtrainer.TrainingArguments(str(tmp_path), nan_policy="stop")


def test_fp16_skip_keeps_the_loss_scale(tmp_path):
    # A NaN batch is not an overflow: the skipped step must not halve the fp16 loss scale. The labels equal
    # the initial model's predictions (zero loss, no fp16 overflow), so only the NaN step could change the scale.
    torch_trainer = torch_run(tmp_path / "t", rows(16, 4, BAD_STEP, slope=0.5, offset=0.0), nan_policy="skip", fp16=True)
    torch_trainer.train()
    assert torch_trainer._backend_state.scaler.get_scale() == 2.0**16
    assert np.all(np.isfinite(torch_weights(torch_trainer)))
    jax_trainer = jax_run(tmp_path / "j", rows(32, 8, BAD_STEP, slope=0.5, offset=0.0), nan_policy="skip", fp16=True)
    jax_trainer.train()
    assert float(jax_trainer._backend_state["loss_scale"]) == 2.0**15
    assert [h["nan_skipped_steps"] for h in jax_trainer.state.log_history if "loss" in h] == [0, 0, 1, 1]
    assert np.all(np.isfinite(jax_weights(jax_trainer)))
