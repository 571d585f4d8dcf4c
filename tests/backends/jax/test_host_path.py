"""The JAX backend's per-step host path: plain-array train state, window placement, reused scalars."""

import jax
import numpy as np
import pytest
from flax import nnx

import xtrainer
from jax_models import RegressionMLP, regression_rows


def _trainer(tmp_path, **kwargs):
    defaults = dict(backend="jax", per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2, save_strategy="no",
                    report_to="none", disable_tqdm=True, train_sampling_strategy="sequential")
    defaults.update(kwargs)
    args = xtrainer.TrainingArguments(str(tmp_path), **defaults)
    return xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0), dropout=0.1), args=args,
                            train_dataset=regression_rows(32), eval_dataset=regression_rows(8, seed=1))


def test_nnx_train_state_holds_plain_arrays_and_the_model_gets_the_trained_weights(tmp_path):
    trainer = _trainer(tmp_path)
    before = np.asarray(trainer.model.l1.kernel[...]).copy()
    trainer.train()
    state = trainer._backend_state
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves and not any(isinstance(x, nnx.Variable) for x in leaves)
    assert all(isinstance(x, jax.Array) for x in leaves)
    # params (incl. the dropout RNG counts in `extra`) keep the model's own structure, without Variable nodes
    assert set(state["params"]) == {"l1", "norm", "l2"} and set(state["params"]["l1"]) == {"kernel", "bias"}
    after = np.asarray(trainer.model.l1.kernel[...])
    np.testing.assert_array_equal(after, np.asarray(state["params"]["l1"]["kernel"]))
    assert not np.array_equal(before, after)
    # the dropout stream's count lives in `extra` as a plain array; it advanced in the written-back model
    assert int(np.asarray(state["extra"]["drop"]["rngs"]["count"])) > 0
    assert int(np.asarray(trainer.model.drop.rngs.count[...])) == int(np.asarray(state["extra"]["drop"]["rngs"]["count"]))

def test_window_arrays_land_on_the_mesh_and_scalars_are_reused(tmp_path):
    trainer = _trainer(tmp_path)
    backend = trainer.backend
    rows = [{"x": np.ones((4, 4), np.float32), "labels": np.zeros(4, np.float32)}]
    arrays, mask, real = backend.shard_window(rows)
    assert real == 1 and arrays["x"].shape == (1, 4, 4)
    assert arrays["x"].sharding.is_equivalent_to(backend._batch_sharding(np.zeros((1, 4, 4)), 1), 3)
    np.testing.assert_array_equal(np.asarray(arrays["x"]), np.ones((1, 4, 4)))
    _, mask_again, _ = backend.shard_window(rows)
    assert mask_again is mask  # an equal mask is not transferred again
    a = backend._replicate(np.float32(7), reuse=True)
    assert backend._replicate(np.float32(7), reuse=True) is a
    assert backend._replicate(np.float32(8), reuse=True) is not a
    # without reuse (values that go into the donated state) every call is a fresh array
    assert backend._replicate(np.float32(7)) is not a
    for value in range(100):  # the cache stays bounded
        backend._replicate(np.float32(value), reuse=True)
    assert len(backend._scalar_cache) <= 64


def test_plateau_scaled_learning_rate_survives_donation(tmp_path):
    # lr_scale is written into the donated state after each evaluation; a reused (cached) array
    # there would be deleted by the next step and break the run.
    # min_lr makes the scale repeat (0.25 three times): a cached array would be handed out again
    # after the step had donated (deleted) it.
    trainer = _trainer(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=1, logging_steps=1,
                       lr_scheduler_type="reduce_lr_on_plateau",
                       lr_scheduler_kwargs={"patience": 0, "factor": 0.5, "min_lr": 0.25e-7},
                       learning_rate=1e-7)  # too small to improve the eval loss by the plateau's threshold
    trainer.train()
    rates = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert len(rates) == 6 and rates[0] == pytest.approx(1e-7) and rates[-1] == pytest.approx(0.25e-7)
    assert all(later <= earlier for earlier, later in zip(rates, rates[1:]))
    assert float(np.asarray(trainer._backend_state["lr_scale"])) == pytest.approx(0.25)
