"""The TrainingArguments attributes transformers scripts read (device, world_size, main_process_first, ...):
transformers' values on one CPU process, and main_process_first as a real barrier across processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import xtrainer

transformers = pytest.importorskip("transformers")
HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))

ATTRIBUTES = ("device", "n_gpu", "world_size", "process_index", "local_process_index", "should_log", "should_save",
              "train_batch_size", "eval_batch_size", "place_model_on_device", "ddp_timeout_delta",
              "_no_sync_in_gradient_accumulation")
CASES = [
    dict(),
    dict(per_device_train_batch_size=3, per_device_eval_batch_size=5, log_on_each_node=False, save_on_each_node=True),
    dict(use_cpu=True, log_level="info", log_level_replica="error", ddp_timeout=60, warmup_steps=0.25),
]


@pytest.mark.parametrize("kwargs", CASES)
def test_attributes_equal_transformers_on_one_cpu_process(tmp_path, kwargs):
    ours = xtrainer.TrainingArguments(str(tmp_path), backend="torch", **kwargs)
    theirs = transformers.TrainingArguments(str(tmp_path), **kwargs)
    for name in ATTRIBUTES:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.parallel_mode.value == theirs.parallel_mode.value
    assert ours.get_process_log_level() == theirs.get_process_log_level()
    assert ours.get_warmup_steps(10) == theirs.get_warmup_steps(10)
    assert ours.to_dict() == {k: v for k, v in theirs.to_dict().items()} | {k: ours.to_dict()[k] for k in ours.to_dict() if k not in theirs.to_dict()}
    assert ours.to_sanitized_dict() == theirs.to_sanitized_dict() | {k: v for k, v in ours.to_sanitized_dict().items() if k not in theirs.to_sanitized_dict()}
    with ours.main_process_first(desc="one process: no wait"):
        pass


def test_setters_equal_transformers(tmp_path):
    calls = [("set_training", dict(learning_rate=1e-4, batch_size=16, num_epochs=2, seed=7)),
             ("set_evaluate", dict(strategy="steps", steps=50, batch_size=4, delay=1)),
             ("set_testing", dict(batch_size=3, loss_only=True)),
             ("set_save", dict(strategy="steps", steps=100, total_limit=2)),
             ("set_logging", dict(strategy="steps", steps=10, report_to="none", level="info", first_step=True)),
             ("set_push_to_hub", dict(model_id="me/model", strategy="checkpoint", private_repo=True)),
             ("set_optimizer", dict(name="adamw_torch", learning_rate=3e-4, beta1=0.8, args="a=1")),
             ("set_lr_scheduler", dict(name="cosine", num_epochs=5, warmup_steps=0.1)),
             ("set_dataloader", dict(train_batch_size=4, eval_batch_size=2, drop_last=True, sampler_seed=3))]
    ours = xtrainer.TrainingArguments(str(tmp_path), backend="torch")
    theirs = transformers.TrainingArguments(str(tmp_path))
    for name, kwargs in calls:
        assert getattr(ours, name)(**kwargs) is ours
        getattr(theirs, name)(**kwargs)
        shared = set(ours.to_dict()) & set(theirs.to_dict())
        assert {k: ours.to_dict()[k] for k in shared} == {k: theirs.to_dict()[k] for k in shared}, name
    with pytest.raises(ValueError, match="positive number of `steps`"):
        ours.set_save(strategy="steps", steps=0)


def test_str_and_json_equal_transformers(tmp_path):
    ours = xtrainer.TrainingArguments(str(tmp_path), backend="torch", hub_token="secret", debug="underflow_overflow")
    theirs = transformers.TrainingArguments(str(tmp_path), hub_token="secret", debug="underflow_overflow")
    ours_json, theirs_json = json.loads(ours.to_json_string()), json.loads(theirs.to_json_string())
    assert {k: ours_json[k] for k in theirs_json} == theirs_json
    assert ours_json["hub_token"] == "<HUB_TOKEN>"


def test_device_on_jax_makes_model_to_harmless(tmp_path):
    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax")
    assert args.device == torch.device("cpu") and args.n_gpu == 0
    model = torch.nn.Linear(2, 2).to(args.device)  # what transformers' scripts do before building the Trainer
    assert next(model.parameters()).device.type == "cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(tmp_path, backend: str) -> list[dict]:
    marker = str(tmp_path / "marker")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), OMP_NUM_THREADS="1")
        for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "RANK", "WORLD_SIZE"):
            env.pop(key, None)
        if backend == "jax":
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank))
        else:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                       LOCAL_RANK=str(rank))
        # JAX runs one process per host, so each is its host's main process: the run-wide order needs local=False.
        local = "0" if backend == "jax" else "1"
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "main_first_worker.py"), backend, marker, local],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads([l for l in out.splitlines() if l.startswith("RESULT=")][0][len("RESULT="):]))
    return results


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_main_process_first_is_a_barrier_across_processes(tmp_path, backend):
    if backend == "jax":
        pytest.importorskip("flax")
    main, replica = _run_two(tmp_path, backend)
    assert main["world_size"] == replica["world_size"] == 2
    assert (main["process_index"], replica["process_index"]) == (0, 1)
    assert main["should_save"] and not replica["should_save"]
    assert main["parallel_mode"] == "distributed"
    assert replica["marker_found"]  # the replica entered only after the main process had finished its block
