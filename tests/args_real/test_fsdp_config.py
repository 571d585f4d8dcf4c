"""fsdp_config: on torch every key FSDP2 has an equivalent for acts (torchrun, 2 processes, gloo on CPU; one
launch runs all cases of fsdp_worker.py); on jax / torch_xla the keys that map onto the mesh act and the others
are named in one warning each."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
import torch.distributed as dist  # noqa: E402

from xtrainer import TrainingArguments  # noqa: E402
from xtrainer.fsdp_options import FsdpOptions  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LAUNCH_TIMEOUT_S = 300

_spec = importlib.util.spec_from_file_location("xtrainer_fsdp_worker", HERE / "fsdp_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """All cases in one torchrun launch (interpreter start-up is most of its cost); rank 0's results per case."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    out = tmp_path_factory.mktemp("fsdp_config")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           f"--master_port={_free_port()}", str(HERE / "fsdp_worker.py"), "--out", str(out), *worker.CASES]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    return out, proc.returncode, output


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch 4 (= 2 processes x 2), no FSDP: what every exact case must reproduce."""
    from xtrainer import Trainer

    out = tmp_path_factory.mktemp("fsdp_reference")
    trainer = Trainer(model=worker.base.tiny_gpt2(seed=0), args=worker.make_args(str(out), 4),
                      train_dataset=worker.base.lm_data())
    trainer.train()
    return {"weights": {k: v.numpy() for k, v in worker.base.model_weights(trainer.model).items()},
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "dir": out}


def _result(launched, case: str) -> dict:
    out, status, output = launched
    path = out / case / "result.json"
    if not path.is_file():
        pytest.fail(f"torchrun produced no result for {case} (exit status {status}):\n{output[-4000:]}")
    return json.loads(path.read_text())


def _max_diff(result: dict, reference: dict) -> float:
    return max(float(np.abs(np.asarray(result["weights"][k]) - v).max()) for k, v in reference["weights"].items())


def _assert_trains_like_reference(result, reference):
    assert _max_diff(result, reference) < 1e-5
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-5)


def test_reshard_after_forward(launched, reference):
    result = _result(launched, "reshard_false")
    assert {name: unit["reshard_after_forward"] for name, unit in result["units"].items()} == {
        "<root>": False, "transformer.h.0": False}
    default = _result(launched, "no_wrap")["units"]["<root>"]
    assert default["reshard_after_forward"]  # the default keeps resharding
    _assert_trains_like_reference(result, reference)


def test_min_num_params_wraps_every_module_above_the_threshold(launched, reference):
    model = worker.base.tiny_gpt2(seed=0)
    tied = {"transformer", "transformer.wte", "lm_head"}  # hold the tied embedding, also used outside them
    expected = {name for name, m in model.named_modules()
                if name and name not in tied and not isinstance(m, torch.nn.ModuleList)
                and sum(p.numel() for p in m.parameters()) > 1000}
    result = _result(launched, "size_wrap")
    assert set(result["units"]) == expected | {"<root>"}
    assert {"transformer.h.0.attn", "transformer.h.0.mlp.c_fc"} <= expected  # not just the default block units
    _assert_trains_like_reference(result, reference)


def test_no_wrap_shards_the_root_only(launched, reference):
    result = _result(launched, "no_wrap")
    assert set(result["units"]) == {"<root>"}
    _assert_trains_like_reference(result, reference)


def test_activation_checkpointing_recomputes_the_blocks(launched, reference):
    result = _result(launched, "checkpointing")
    plain = _result(launched, "no_wrap")
    assert result["checkpoint_wrappers"] == 1 and plain["checkpoint_wrappers"] == 0
    # Each micro-batch runs the block's forward twice: once forward, once recomputed in the backward pass.
    assert result["forward_calls"] == 2 * plain["forward_calls"] > 0
    _assert_trains_like_reference(result, reference)


def test_mixed_precision_policy_gathers_parameters_in_bfloat16(launched, reference):
    result = _result(launched, "mixed_precision")
    assert result["forward_dtypes"] == ["torch.bfloat16"]
    assert _result(launched, "no_wrap")["forward_dtypes"] == ["torch.float32"]
    np.testing.assert_allclose(result["losses"], reference["losses"], atol=2e-2)  # same run, in bfloat16
    assert _max_diff(result, reference) > 1e-4


def test_cpu_ram_efficient_loading_takes_rank_zeros_weights(launched, reference):
    """Rank 1 built its model on the meta device (no weights): the run still equals the reference."""
    _assert_trains_like_reference(_result(launched, "ram_efficient"), reference)


def test_sharded_state_dict_checkpoints(launched, reference, tmp_path):
    result = _result(launched, "sharded_state")
    files = set(result["checkpoint_files"])
    assert {"pytorch_model_fsdp_0", "optimizer_shards", "config.json"} <= files and "model.safetensors" not in files
    _assert_trains_like_reference(result, reference)
    # Two processes resumed from the sharded checkpoint (another initialisation) end with the same weights.
    assert result["resumed_weights"] == result["weights"]
    # One process reads the two processes' shards back too.
    from xtrainer import Trainer

    out, _, _ = launched
    single = Trainer(model=worker.base.tiny_gpt2(seed=1), args=worker.make_args(str(tmp_path), 4),
                     train_dataset=worker.base.lm_data())
    single.train(resume_from_checkpoint=str(out / "sharded_state" / "run" / "checkpoint-2"))
    final = {k: v.numpy() for k, v in worker.base.model_weights(single.model).items()}
    assert max(float(np.abs(final[k] - v).max()) for k, v in reference["weights"].items()) < 1e-5


def test_hybrid_shard_uses_a_two_dimensional_mesh(launched, reference):
    result = _result(launched, "hybrid")
    assert {tuple(unit["mesh"]) for unit in result["units"].values()} == {(2, 1)}  # replicate x2, shard x1
    _assert_trains_like_reference(result, reference)


def test_keys_without_an_fsdp2_equivalent_are_named(caplog):
    from xtrainer.backends.torch import fsdp

    args = TrainingArguments("/tmp/xtrainer-fsdp-keys", report_to="none", fsdp=True, fsdp_config={
        "limit_all_gathers": True, "backward_prefetch": "BACKWARD_PRE", "xla": True, "version": 1,
        "min_num_params": 10, "transformer_layer_cls_to_wrap": ["GPT2Block"], "cpu_offload": True, "typo_key": 1})
    with caplog.at_level(logging.WARNING, logger="xtrainer.backends.torch.fsdp"):
        fsdp.warn_unsupported(FsdpOptions.from_args(args))
    named = {r.getMessage().split("'")[1] for r in caplog.records}
    assert named == {"limit_all_gathers", "backward_prefetch", "xla", "version", "min_num_params", "typo_key"}


def test_cpu_offload_and_mixed_precision_policies():
    from torch.distributed.fsdp import CPUOffloadPolicy

    from xtrainer.backends.torch import fsdp

    options = FsdpOptions.from_args(TrainingArguments("/tmp/x", report_to="none", fsdp="full_shard offload"))
    assert isinstance(fsdp._offload(options, torch.device("cuda")), CPUOffloadPolicy)
    assert fsdp._offload(options, torch.device("cpu")) is None  # already in host memory (warned)
    bf16 = TrainingArguments("/tmp/x", report_to="none", fsdp=True, bf16=True)
    policy = fsdp._mixed_precision(FsdpOptions.from_args(bf16), bf16)
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16,) * 3  # as accelerate
    custom = TrainingArguments("/tmp/x", report_to="none", fsdp=True, bf16=True,
                               fsdp_config={"mixed_precision_policy": {"param_dtype": "bf16", "reduce_dtype": "fp32"}})
    policy = fsdp._mixed_precision(FsdpOptions.from_args(custom), custom)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)


def test_unknown_layer_class_is_refused():
    from xtrainer.backends.torch import fsdp

    options = FsdpOptions.from_args(TrainingArguments("/tmp/x", report_to="none", fsdp=True,
                                                      fsdp_config={"transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}))
    with pytest.raises(ValueError, match="LlamaDecoderLayer"):
        fsdp.wrap_units(worker.base.tiny_gpt2(seed=0), options)


# ------------------------------------------------------------------ jax


def test_jax_min_num_params_and_activation_checkpointing(tmp_path, caplog):
    pytest.importorskip("flax")
    import jax

    import xtrainer
    from helpers import lm_data
    from test_fsdp import _flax_llama

    args = xtrainer.TrainingArguments(
        str(tmp_path), backend="jax", fsdp=True, report_to="none", per_device_train_batch_size=1,
        fsdp_config={"min_num_params": 600, "activation_checkpointing": True, "cpu_offload": True,
                     "transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "state_dict_type": "SHARDED_STATE_DICT"})
    with caplog.at_level(logging.WARNING, logger="xtrainer.fsdp_options"):
        trainer = xtrainer.Trainer(model=_flax_llama(), args=args, train_dataset=lm_data(8, seq=8, vocab=64))
    backend = trainer.backend
    sizes = jax.tree.map(np.size, backend.adapter.params)
    specs = jax.tree.map(lambda s: tuple(s.spec), backend.param_shardings)
    leaves = list(zip(jax.tree.leaves(sizes), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, tuple))))
    assert any(size >= 600 for size, _ in leaves) and any(size < 600 for size, _ in leaves)
    assert all(("fsdp" in spec) == (size >= 600) for size, spec in leaves)  # the 1024-element tables only
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    backend.init_state(1, trainer.optimizer, trainer.lr_scheduler)
    assert backend.config.remat  # fsdp_config's activation_checkpointing: the step rematerialises
    warned = {r.getMessage().split("'")[1] for r in caplog.records}
    assert warned == {"cpu_offload", "transformer_layer_cls_to_wrap", "state_dict_type"}
