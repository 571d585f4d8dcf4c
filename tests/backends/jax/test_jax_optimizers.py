"""The optax optimizers of backend='jax', against the torch library transformers uses for the same `optim` value
(same tensors, same gradients, same schedule), and end to end: schedule-free evaluation, the greedy schedule,
optimizer_cls_and_kwargs, refusals."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import xtrainer
from jax_models import RegressionMLP, regression_rows
from xtrainer.optimizers import SUPPORT, supported_optimizers
from xtrainer.trainer_utils import OptimizerNames

BASE = dict(backend="jax", per_device_train_batch_size=1, logging_steps=1, save_strategy="no", report_to="none",
            disable_tqdm=True, learning_rate=0.02, train_sampling_strategy="sequential")
STEPS = 8
MODULES = {"torch-optimi": "optimi"}
# Options that make each comparison exercise more than the defaults.
OPTIONS = {"ademamix": "t_alpha=4,t_beta3=5,beta3=0.999", "sgd": "momentum=0.9,nesterov=True",
           "rmsprop": "momentum=0.5,centered=True,alpha=0.9"}


def _torch_reference(name: str) -> str:
    # syncfree AdamW is AdamW's update; the torch backend cannot build it without torch_xla.
    return "adamw_torch" if name == "adamw_torch_xla" else name


@pytest.mark.parametrize("name", supported_optimizers("jax"))
def test_optax_update_matches_the_torch_library(name):
    torch = pytest.importorskip("torch")
    from xtrainer.backends.jax.optim import build_optimizer as build_optax, eval_params
    from xtrainer.backends.torch.optim import build_optimizer as build_torch
    from xtrainer.backends.torch.schedulers import build_lr_scheduler
    from xtrainer.schedules import schedule_from_args

    library = SUPPORT[OptimizerNames(_torch_reference(name))]["torch"].library
    if library and importlib.util.find_spec(MODULES.get(library, library)) is None:
        pytest.skip(f"{library} is not installed in this lane")
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    grads = [(rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)) for _ in range(STEPS)]
    kw = dict(learning_rate=0.01, weight_decay=0.1, warmup_steps=2, lr_scheduler_type="linear", adam_beta2=0.99,
              optim_args=OPTIONS.get(name), report_to="none")

    class Params(torch.nn.Module):  # "w" decays, "bias" does not, on both sides
        def __init__(self):
            super().__init__()
            self.w, self.bias = torch.nn.Parameter(torch.tensor(w0)), torch.nn.Parameter(torch.tensor(b0))

    module = Params()
    torch_args = xtrainer.TrainingArguments("/tmp/o", optim=_torch_reference(name), **kw)
    optimizer = build_torch(module, torch_args)
    scheduler = build_lr_scheduler(optimizer, torch_args, STEPS)
    args = xtrainer.TrainingArguments("/tmp/o", optim=name, **kw)
    tx, schedule = build_optax(args), schedule_from_args(args, STEPS)
    params = {"w": jnp.asarray(w0), "bias": jnp.asarray(b0)}
    state = tx.init(params)
    for step, (gw, gb) in enumerate(grads):
        if hasattr(optimizer, "train"):
            optimizer.train()
        module.w.grad, module.bias.grad = torch.tensor(gw), torch.tensor(gb)
        optimizer.step()
        scheduler.step()
        state.hyperparams["learning_rate"] = jnp.asarray(0.01 * schedule(step), jnp.float32)  # what the step does
        updates, state = tx.update({"w": jnp.asarray(gw), "bias": jnp.asarray(gb)}, state, params)
        params = optax.apply_updates(params, updates)
    if hasattr(optimizer, "eval"):  # schedule-free: compare the averaged weights too
        optimizer.eval()
        params = eval_params(state, params)
    assert np.abs(module.w.detach().numpy() - w0).max() > 1e-3
    np.testing.assert_allclose(np.asarray(params["w"]), module.w.detach().numpy(), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["bias"]), module.bias.detach().numpy(), rtol=2e-5, atol=1e-6)


def _trainer(tmp_path, data=None, **kw):
    data = data if data is not None else regression_rows(32)
    args = xtrainer.TrainingArguments(str(tmp_path), **{**BASE, **kw})
    return xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=args, train_dataset=data,
                            eval_dataset=data[:16])


def test_schedule_free_evaluates_the_averaged_weights(tmp_path, monkeypatch):
    from xtrainer.backends.jax import optim

    trainer = _trainer(tmp_path, optim="schedule_free_sgd", max_steps=6, learning_rate=0.05)
    trainer.train()
    averaged = trainer.evaluate()["eval_loss"]
    state = trainer._backend_state
    x = optim.eval_params(state["opt_state"], state["params"])
    monkeypatch.setattr(optim, "is_schedule_free", lambda opt_state: False)
    raw = trainer.evaluate()["eval_loss"]  # the training point y
    state["params"] = x
    assert trainer.evaluate()["eval_loss"] == pytest.approx(averaged, rel=1e-6)
    assert raw != pytest.approx(averaged, rel=1e-4)


def test_greedy_follows_the_eval_loss_and_is_checkpointed(tmp_path):
    from xtrainer.schedules import METRIC_SCHEDULE_FILE, greedy_init, greedy_update

    kwargs = {"patience": 0, "factor": 0.5, "min_lr": 1e-3, "max_lr": 0.2}
    trainer = _trainer(tmp_path, max_steps=5, eval_strategy="steps", eval_steps=1, lr_scheduler_type="greedy",
                       lr_scheduler_kwargs=kwargs, learning_rate=0.05, save_strategy="steps", save_steps=5)
    trainer.train()
    history = trainer.state.log_history
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    lrs = [h["learning_rate"] for h in history if "learning_rate" in h]
    state, expected = greedy_init(0.05, kwargs), [0.05]
    for loss in evals[:-1]:
        state = greedy_update(state, loss)
        expected.append(state.lr)
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert len(set(lrs)) > 1
    with open(os.path.join(tmp_path, "checkpoint-5", METRIC_SCHEDULE_FILE)) as f:
        saved = json.load(f)
    assert saved["kind"] == "greedy" and saved["state"]["lr"] == pytest.approx(greedy_update(state, evals[-1]).lr)


def test_optimizer_cls_and_kwargs_takes_an_optax_factory(tmp_path):
    trainer = xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)),
                               args=xtrainer.TrainingArguments(str(tmp_path), **{**BASE, "max_steps": 3,
                                                                                 "lr_scheduler_type": "constant"}),
                               train_dataset=regression_rows(32),
                               optimizer_cls_and_kwargs=(optax.sgd, {"learning_rate": 0.1, "momentum": 0.9}))
    trainer.train()
    state = trainer._backend_state["opt_state"]
    assert float(state.hyperparams["momentum"]) == pytest.approx(0.9)
    assert [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h] == [0.1, 0.1, 0.1]


def test_torch_only_choices_fail_at_construction(tmp_path):
    torch = pytest.importorskip("torch")
    args = lambda **kw: xtrainer.TrainingArguments(str(tmp_path), **{**BASE, **kw})  # noqa: E731
    with pytest.raises(ValueError, match=r"optim='galore_adamw' cannot run on backend='jax'.*runs on backend='torch'.*: adamw_torch, "):
        xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=args(optim="galore_adamw"))
    with pytest.raises(TypeError, match="torch optimizer SGD, which cannot run on backend='jax'"):
        xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=args(),
                         optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}))
    with pytest.raises(ValueError, match="dampening"):
        xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=args(optim="sgd", optim_args="dampening=0.5"))
