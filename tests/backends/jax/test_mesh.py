"""Meshes and sharding on 8 fake CPU devices: config validation, rules, and equal loss curves."""

import contextlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import xtrainer
from jax_models import RegressionMLP
from xtrainer.sharding import MeshConfig, fsdp_spec, logical_to_spec, param_spec, parse_sharding_rules

HERE = os.path.dirname(__file__)


def _unsharded_construction():
    # flax >= 0.12 shards annotated variables eagerly at construction, which needs a mesh; the
    # backend places them itself, so build them unsharded.
    use = getattr(nnx, "use_eager_sharding", None)
    return use(False) if use is not None else contextlib.nullcontext()


class AnnotatedMLP(nnx.Module):
    """An MLP whose parameters carry Flax logical axis names (embed / mlp)."""

    def __init__(self, rngs):
        part = nnx.with_partitioning
        with _unsharded_construction():
            self.up = nnx.Linear(4, 16, kernel_init=part(nnx.initializers.lecun_normal(), ("embed", "mlp")), rngs=rngs)
            self.down = nnx.Linear(16, 4, kernel_init=part(nnx.initializers.lecun_normal(), ("mlp", "embed")), rngs=rngs)
            self.head = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x, labels=None):
        y = self.head(nnx.relu(self.down(nnx.gelu(self.up(x)))))[..., 0]
        return {"loss": jnp.mean((y - labels) ** 2), "logits": y}


def test_mesh_config_resolution_and_errors():
    assert MeshConfig.resolve({"data": -1}, 8).shape == (8, 1, 1)
    assert MeshConfig.resolve({"data": 2, "fsdp": -1}, 8).shape == (2, 4, 1)
    assert MeshConfig.resolve(None, 4).shape == (4, 1, 1)
    assert MeshConfig.resolve('{"data": 2, "fsdp": 2, "tensor": 2}', 8).batch_devices == 4
    with pytest.raises(ValueError, match="needs 4 devices but 8 are present"):
        MeshConfig.resolve({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        MeshConfig.resolve({"model": 8}, 8)
    with pytest.raises(ValueError, match="-1 for one axis only"):
        MeshConfig.resolve({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="does not divide"):
        MeshConfig.resolve({"data": 3, "fsdp": -1}, 8)


def test_trainer_rejects_a_mesh_that_does_not_fit_the_devices(tmp_path):
    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax", mesh={"data": 3, "fsdp": 1})
    with pytest.raises(ValueError, match="needs 3 devices but 8 are present"):
        xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=args)


def test_default_fsdp_rule_and_user_rules():
    mesh = MeshConfig(2, 4, 1)
    assert fsdp_spec((16, 6), mesh) == ("fsdp", None)
    assert fsdp_spec((6, 16), mesh) == (None, "fsdp")
    assert fsdp_spec((3, 5), mesh) == (None, None)
    rules = parse_sharding_rules([["attn.*kernel", [None, "fsdp"]], ["bias", []]])
    assert param_spec("layer.attn.q.kernel", (8, 8), mesh, rules) == (None, "fsdp")
    assert param_spec("layer.mlp.bias", (16,), mesh, rules) == (None,)
    assert param_spec("layer.attn.q.kernel", (8, 6), mesh, rules) == (None, None)  # 6 % 4: replicate
    assert logical_to_spec(("embed", "mlp")) == ("fsdp", "tensor")
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        parse_sharding_rules([["x", ["model"]]])


def test_parameter_shardings_follow_rules_then_annotations_then_fsdp(tmp_path):
    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax", mesh={"data": 2, "fsdp": 2, "tensor": 2},
                                      sharding_rules=[["head.kernel", ["fsdp", None]]])
    trainer = xtrainer.Trainer(model=AnnotatedMLP(nnx.Rngs(0)), args=args)
    specs = {}
    for path, arr in jax.tree_util.tree_flatten_with_path(trainer.backend.params)[0]:
        name = ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path if getattr(k, "name", None) != "value")
        specs[name] = tuple(arr.sharding.spec)
    assert specs["up.kernel"] == ("fsdp", "tensor")  # logical (embed, mlp)
    assert specs["down.kernel"] == ("tensor", "fsdp")  # logical (mlp, embed)
    assert specs["head.kernel"] == ("fsdp", None)  # user rule wins
    assert specs["up.bias"] == ("fsdp",)  # no annotation: default FSDP rule (16 % 2 == 0)


def _curve(devices: int, mesh: dict, per_device: int) -> list[float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.dirname(HERE))), HERE]))
    out = subprocess.run([sys.executable, os.path.join(HERE, "mesh_run.py"), str(devices), json.dumps(mesh), str(per_device)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("LOSSES=")][0]
    return json.loads(line[len("LOSSES="):])


def test_loss_curve_is_the_same_on_every_mesh():
    """Global batch 8 everywhere: one device, then (8,1,1), (2,4,1) and (2,2,2) (tensor does not split the batch)."""
    reference = _curve(1, {"data": 1}, 8)
    for mesh, per_device in (({"data": 8}, 1), ({"data": 2, "fsdp": 4}, 1), ({"data": 2, "fsdp": 2, "tensor": 2}, 2)):
        np.testing.assert_allclose(_curve(8, mesh, per_device), reference, rtol=2e-5, err_msg=str(mesh))
    assert len(reference) == 8 and len(set(reference)) == 8
