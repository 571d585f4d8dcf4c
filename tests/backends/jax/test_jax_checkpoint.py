"""JAX checkpoints: orbax state in checkpoint-N/, bitwise resume, restore onto another mesh, best model."""

import copy
import os

import jax
import numpy as np
import pytest
from flax import nnx

import xtrainer
from jax_models import RegressionMLP, regression_rows

BASE = dict(backend="jax", per_device_train_batch_size=1, logging_steps=1, report_to="none", disable_tqdm=True,
            learning_rate=0.02, max_steps=8, save_steps=4, seed=3)


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


class StepCounter(xtrainer.TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def _run(model, tmp_path, resume=None, **kw):
    args = xtrainer.TrainingArguments(str(tmp_path), **{**BASE, **kw})
    trainer = xtrainer.Trainer(model=model, args=args, train_dataset=regression_rows(48), callbacks=[StepCounter()])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_layout_and_bitwise_resume(tmp_path):
    base = RegressionMLP(nnx.Rngs(0, dropout=5), dropout=0.2)  # dropout: the RNG must resume too
    full = _run(copy.deepcopy(base), tmp_path)
    ckpt = tmp_path / "checkpoint-4"
    assert {"trainer_state.json", "training_args.bin", "jax_state"} <= set(os.listdir(ckpt))
    resumed = _run(copy.deepcopy(base), tmp_path, resume=str(ckpt))
    for a, b in zip(_params(full.model), _params(resumed.model)):
        np.testing.assert_array_equal(a, b)  # bitwise on CPU
    steps = lambda t: {h["step"]: h["loss"] for h in t.state.log_history if "loss" in h}  # noqa: E731
    assert steps(resumed) == steps(full)
    assert resumed.backend._host_step == 8
    assert resumed.callback_handler.pop_callback(StepCounter).steps == 4  # only the steps after the checkpoint ran


def _to_variable_layout(path):
    """Rewrites a checkpoint's JAX state into the layout of xtrainer builds whose NNX train state held
    nnx Variables: every NNX leaf (params, extra, optimizer moments) one level deeper, under "value"."""
    import shutil

    import orbax.checkpoint as ocp

    from xtrainer.manifest import write_manifest

    state_dir = os.path.abspath(os.path.join(path, "jax_state"))
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(state_dir)

    def nested(node, under_variable):
        if isinstance(node, dict):
            return {k: nested(v, under_variable or k in ("params", "extra", "mu", "nu")) for k, v in node.items()}
        if isinstance(node, list):
            return [nested(v, under_variable) for v in node]
        return {"value": node} if under_variable else node

    legacy = nested(state, False)
    shutil.rmtree(state_dir)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(state_dir, legacy)
        checkpointer.wait_until_finished()
    os.remove(os.path.join(path, "xtrainer_manifest.json"))
    write_manifest(str(path))
    return legacy


def test_checkpoint_in_the_earlier_variable_layout_resumes_bitwise(tmp_path):
    base = RegressionMLP(nnx.Rngs(0, dropout=5), dropout=0.2)
    full = _run(copy.deepcopy(base), tmp_path)
    ckpt = tmp_path / "checkpoint-4"
    legacy = _to_variable_layout(ckpt)
    assert set(legacy["params"]["l1"]["kernel"]) == {"value"}
    assert set(legacy["extra"]["drop"]["rngs"]["key"]) == {"value"}
    resumed = _run(copy.deepcopy(base), tmp_path, resume=str(ckpt))
    for a, b in zip(_params(full.model), _params(resumed.model)):
        np.testing.assert_array_equal(a, b)
    steps = lambda t: {h["step"]: h["loss"] for h in t.state.log_history if "loss" in h}  # noqa: E731
    assert steps(resumed) == steps(full)


def test_restore_onto_a_different_mesh(tmp_path):
    base = RegressionMLP(nnx.Rngs(0))
    on_2x4 = _run(copy.deepcopy(base), tmp_path / "a", mesh={"data": 2, "fsdp": 4})
    reference = _run(copy.deepcopy(base), tmp_path / "b", mesh={"data": 8})
    moved = _run(copy.deepcopy(base), tmp_path / "c", mesh={"data": 8},
                 resume=str(tmp_path / "a" / "checkpoint-4"))
    for a, b, c in zip(_params(on_2x4.model), _params(reference.model), _params(moved.model)):
        np.testing.assert_allclose(c, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)
    shardings = {x.sharding.spec for x in jax.tree.leaves(moved._backend_state["params"])}
    assert all("fsdp" not in str(spec) for spec in shardings)  # the restored state lives on the new mesh


def test_best_model_is_loaded_at_end_and_kept_by_rotation(tmp_path):
    data = regression_rows(48)
    seen = {}

    def metric(pred):
        # A made-up metric that peaks at the 2nd evaluation, so the best checkpoint is not the last.
        seen["n"] = seen.get("n", 0) + 1
        return {"score": [0.1, 0.9, 0.3, 0.2][seen["n"] - 1]}

    args = xtrainer.TrainingArguments(str(tmp_path), **{**BASE, "max_steps": 8, "save_steps": 2, "eval_steps": 2},
                                      eval_strategy="steps", load_best_model_at_end=True, metric_for_best_model="score",
                                      greater_is_better=True, save_total_limit=1)
    snapshots = {}

    class Snapshot(xtrainer.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            snapshots[state.global_step] = [np.asarray(x) for x in jax.tree.leaves(trainer._backend_state["params"])]

    trainer = xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=args, train_dataset=data, eval_dataset=data[:8],
                               compute_metrics=metric, callbacks=[Snapshot()])
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4"]
    for a, b in zip(snapshots[4], _params(trainer.model)):
        np.testing.assert_array_equal(a, b)


def test_resuming_a_torch_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    xtrainer.TrainerState(global_step=2).save_to_json(str(tmp_path / "checkpoint-2" / "trainer_state.json"))
    trainer = xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), train_dataset=regression_rows(16),
                               args=xtrainer.TrainingArguments(str(tmp_path), **BASE))
    with pytest.raises(FileNotFoundError, match="not written by the JAX backend"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_export_writes_flax_weights(tmp_path):
    from flax import serialization

    trainer = _run(RegressionMLP(nnx.Rngs(0)), tmp_path, max_steps=2, save_strategy="no")
    trainer.save_model(str(tmp_path / "export"))
    blob = (tmp_path / "export" / "flax_model.msgpack").read_bytes()
    restored = serialization.msgpack_restore(blob)
    assert np.allclose(restored["l1"]["kernel"], np.asarray(trainer.model.l1.kernel.value))


def test_zero_size_arrays_are_saved_and_restored(tmp_path):
    """orbax refuses to write zero-size arrays (a torch module's empty buffer, for one); they round-trip."""
    import jax
    import jax.numpy as jnp

    from xtrainer.backends.jax import state_io

    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "extra": {"empty": jnp.zeros((0,), jnp.int32)},
             "nothing": None, "step": jnp.asarray(3)}
    state_io.save_state(state, str(tmp_path))
    restored = state_io.restore_state(jax.tree.map(jnp.zeros_like, state), str(tmp_path))
    assert restored["extra"]["empty"].shape == (0,) and restored["extra"]["empty"].dtype == jnp.int32
    assert restored["nothing"] is None and int(restored["step"]) == 3
    assert (restored["params"]["w"] == state["params"]["w"]).all()
