"""fsdp: on jax (and torch_xla) an fsdp mesh axis over the devices that shards the parameters; on torch,
FSDP2 under torchrun (the multi-process runs are in tests/backends/torch/test_distributed.py and, for
fsdp_config, test_fsdp_config.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from xtrainer import TrainingArguments
from xtrainer.fsdp_options import FsdpOptions, spmd_fsdp_plan

SEQ, VOCAB, HIDDEN = 8, 64, 16


def _args(**kw):
    return TrainingArguments("/tmp/xtrainer-fsdp-args", report_to="none", **kw)


@pytest.mark.parametrize("fsdp,sharded,hybrid,reshard", [
    (True, True, False, True), ("true", True, False, True), ("full_shard auto_wrap", True, False, True),
    ("shard_grad_op", True, False, False), ("hybrid_shard", True, True, True), ("hybrid_shard_zero2", True, True, False),
    (["full_shard", "offload"], True, False, True), ("no_shard", False, False, True),
])
def test_fsdp_values_read_as_transformers_maps_them(fsdp, sharded, hybrid, reshard):
    options = FsdpOptions.from_args(_args(fsdp=fsdp))
    assert options.enabled and options.shard == sharded and options.hybrid == hybrid
    assert options.reshard_after_forward == reshard
    assert options.cpu_offload == (not isinstance(fsdp, bool) and "offload" in fsdp)
    assert not FsdpOptions.from_args(_args()).enabled
    with pytest.raises(ValueError, match="Unknown `fsdp` option"):
        FsdpOptions.from_args(_args(fsdp="full_shard sideways"))


@pytest.mark.parametrize("fsdp,processes,mesh", [
    ("full_shard", 1, {"fsdp": -1}), (True, 4, {"fsdp": -1}), ("shard_grad_op", 2, {"fsdp": -1}),
    ("hybrid_shard", 4, {"data": 4, "fsdp": -1}), ("no_shard", 2, {"data": -1}), (None, 2, None),
])
def test_spmd_mesh_from_fsdp(fsdp, processes, mesh):
    assert spmd_fsdp_plan(_args(fsdp=fsdp), None, processes, "jax").mesh == mesh


def test_explicit_mesh_wins_but_must_have_an_fsdp_axis():
    assert spmd_fsdp_plan(_args(fsdp=True), {"data": 2, "fsdp": 4}, 1, "jax").mesh == {"data": 2, "fsdp": 4}
    with pytest.raises(ValueError, match="no fsdp axis"):
        spmd_fsdp_plan(_args(fsdp=True), {"data": -1}, 1, "jax")


# ------------------------------------------------------------------ jax


def _flax_llama():
    from flax import nnx

    from xtrainer.models import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=SEQ)
    return LlamaForCausalLM(config, rngs=nnx.Rngs(0))


def _jax_trainer(tmp_path, **kw):
    import xtrainer
    from helpers import lm_data

    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax", per_device_train_batch_size=1, max_steps=3,
                                      logging_steps=1, learning_rate=1e-2, save_strategy="no", report_to="none",
                                      disable_tqdm=True, train_sampling_strategy="sequential", **kw)
    return xtrainer.Trainer(model=_flax_llama(), args=args, train_dataset=lm_data(24, seq=SEQ, vocab=VOCAB))


def _specs(trainer) -> dict:
    import jax

    flat = jax.tree_util.tree_flatten_with_path(trainer._backend_state["params"])[0]
    return {jax.tree_util.keystr(path): tuple(leaf.sharding.spec) for path, leaf in flat}


def test_jax_full_shard_shards_parameters_over_all_devices(tmp_path):
    pytest.importorskip("flax")
    import jax

    sharded = _jax_trainer(tmp_path / "s", fsdp="full_shard")
    assert sharded.backend.mesh_config.shape == (1, jax.device_count(), 1)
    assert _jax_trainer(tmp_path / "p").backend.mesh_config.shape == (jax.device_count(), 1, 1)  # without fsdp
    sharded.train()
    # After training, the parameters of which a dim divides over the 8 devices are split along the fsdp axis.
    specs = _specs(sharded)
    assert sum("fsdp" in spec for spec in specs.values()) >= 4, specs
    embedding = sharded._backend_state["params"]["model"]["embed_tokens"]["embedding"]
    assert {tuple(s.data.shape) for s in embedding.addressable_shards} == {(VOCAB, HIDDEN // jax.device_count())}
    losses = [h["loss"] for h in sharded.state.log_history if "loss" in h]
    assert len(losses) == 3 and np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_jax_fsdp_against_a_mesh_without_fsdp_axis_is_refused(tmp_path):
    pytest.importorskip("flax")
    with pytest.raises(ValueError, match="no fsdp axis"):
        _jax_trainer(tmp_path, fsdp="full_shard", mesh={"data": -1})


def test_jax_shard_grad_op_says_the_compiler_schedules_the_gathers(tmp_path, caplog):
    pytest.importorskip("flax")
    with caplog.at_level(logging.WARNING, logger="xtrainer.fsdp_options"):
        trainer = _jax_trainer(tmp_path, fsdp="shard_grad_op")
    assert trainer.backend.mesh_config.fsdp > 1
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "shard_grad_op" in messages[0] and "backend='jax'" in messages[0]


# ------------------------------------------------------------------ torch_xla (XLA lane)


def test_torch_xla_full_shard_shards_parameters_over_all_devices(tmp_path):
    pytest.importorskip("torch_xla")
    import torch
    import transformers

    import xtrainer

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB,
                                                                 n_positions=SEQ))
    args = xtrainer.TrainingArguments(str(tmp_path), backend="torch_xla", fsdp=True, report_to="none",
                                      fsdp_config={"min_num_params": 100})
    trainer = xtrainer.Trainer(model=model, args=args)
    assert trainer.backend.mesh_config.shape == (1, 4, 1)
    specs = trainer.backend.param_specs
    assert "fsdp" in specs["transformer.wte.weight"]  # 1024 elements
    assert specs["transformer.ln_f.weight"] == (None,)  # 16 elements, below min_num_params
