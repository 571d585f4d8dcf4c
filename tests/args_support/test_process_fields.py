"""What TrainingArguments says about this process (device, ranks, log levels) and the torch.distributed options.

On one CPU process every property equals transformers' value for the same arguments; other process
layouts are simulated by replacing the layout that args_process reads from the backend's runtime.
"""

import datetime
import logging

import pytest

import xtrainer
from field_probes import backend_params, make_trainer, probe
from xtrainer import args_process, args_support
from xtrainer.args_process import ProcessLayout

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture
def single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def xtrainer_logger_level():
    logger = logging.getLogger("xtrainer")
    before = logger.level
    yield logger
    logger.setLevel(before)


PROPERTIES = ("n_gpu", "world_size", "process_index", "local_process_index", "should_log", "should_save",
              "train_batch_size", "eval_batch_size", "place_model_on_device")


@pytest.mark.parametrize("backend", backend_params())
def test_properties_match_transformers_on_one_cpu_process(tmp_path, backend, single_process):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=3, per_device_eval_batch_size=5,
                  save_on_each_node=True, log_on_each_node=False)
    theirs = transformers.TrainingArguments(**kwargs)
    trainer = make_trainer(backend, tmp_path, **{k: v for k, v in kwargs.items() if k != "output_dir"})
    ours = trainer.args
    if backend == "torch_xla":  # transformers reports an XLA run like this (it is not one here: USE_TORCH_XLA=0)
        assert ours.device.type == "xla" and ours.parallel_mode.value == "tpu" and ours.n_gpu == 0
        assert (ours.world_size, ours.process_index, ours.train_batch_size) == (1, 0, 3)
        return
    assert {p: getattr(ours, p) for p in PROPERTIES} == {p: getattr(theirs, p) for p in PROPERTIES}
    assert ours.device == theirs.device == torch.device("cpu")
    assert ours.parallel_mode.value == theirs.parallel_mode.value == "not_parallel"
    assert (ours.n_gpu, ours.train_batch_size, ours.eval_batch_size) == (0, 3, 5)
    # A transformers script moves its model to args.device; on jax that keeps a torch model on the host,
    # where the backend reads its weights from.
    module = torch.nn.Linear(2, 2).to(ours.device)
    assert module.weight.device == torch.device("cpu")
    with ours.main_process_first(local=False, desc="one process"):
        pass


def _as(monkeypatch, backend, world, rank, local):
    monkeypatch.setattr(args_process, "layout", lambda args: ProcessLayout(backend, world, rank, local))


@pytest.mark.parametrize("backend", backend_params())
def test_log_levels_on_main_and_replica_processes(tmp_path, backend, monkeypatch, xtrainer_logger_level):
    trainer = make_trainer(backend, tmp_path, log_level="error", log_level_replica="info")
    assert xtrainer_logger_level.level == logging.ERROR  # log_level on the main process
    args = trainer.args
    _as(monkeypatch, backend, world=4, rank=3, local=1)  # a replica on the second node
    args_support.apply_to_run(args, backend)
    assert xtrainer_logger_level.level == logging.INFO  # log_level_replica
    _as(monkeypatch, backend, world=4, rank=2, local=0)  # the first process of the second node
    args_support.apply_to_run(args, backend)
    assert xtrainer_logger_level.level == logging.ERROR  # log_on_each_node=True: it logs like the main process
    args.log_on_each_node = False
    args_support.apply_to_run(args, backend)
    assert xtrainer_logger_level.level == logging.INFO  # only the run's first process uses log_level
    args.log_level, args.log_level_replica = "passive", "passive"
    xtrainer_logger_level.setLevel(logging.CRITICAL)
    args_support.apply_to_run(args, backend)
    assert xtrainer_logger_level.level == logging.CRITICAL  # "passive" leaves the level alone


def test_should_save_follows_save_on_each_node(tmp_path, monkeypatch):
    args = xtrainer.TrainingArguments(str(tmp_path), backend="torch", save_on_each_node=True)
    _as(monkeypatch, "torch", world=4, rank=2, local=0)
    assert args.should_save  # the first process of the second node writes its node's checkpoints
    args.save_on_each_node = False
    assert not args.should_save
    _as(monkeypatch, "torch", world=4, rank=1, local=1)
    args.save_on_each_node = True
    assert not args.should_save
    _as(monkeypatch, "jax", world=2, rank=1, local=0)  # JAX hosts write one checkpoint together
    assert not args.should_save


def test_local_rank_is_the_fallback_of_local_process_index(tmp_path, single_process):
    assert xtrainer.TrainingArguments(str(tmp_path), backend="torch", local_rank=3).local_process_index == 3
    assert xtrainer.TrainingArguments(str(tmp_path), backend="torch").local_process_index == 0


def test_ddp_options_reach_ddp(tmp_path, monkeypatch):
    from xtrainer.backends.torch import distributed

    made = []

    class FakeDDP:
        def __init__(self, model, **kwargs):
            made.append(kwargs)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    args = xtrainer.TrainingArguments(str(tmp_path), backend="torch", ddp_find_unused_parameters=False,
                                      ddp_bucket_cap_mb=7, ddp_broadcast_buffers=False, ddp_static_graph=True)
    distributed.wrap_model(probe("torch"), args, distributed.DistInfo(world_size=2), torch.device("cpu"))
    assert made == [{"device_ids": None, "find_unused_parameters": False, "bucket_cap_mb": 7,
                     "broadcast_buffers": False, "static_graph": True}]


def test_process_group_options(tmp_path, monkeypatch):
    from xtrainer.backends.torch import distributed

    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: joined.append(kw))
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    args = xtrainer.TrainingArguments(str(tmp_path), backend="torch", ddp_backend="gloo", ddp_timeout=77)
    distributed.init_from_env(args)
    assert joined == [{"backend": "gloo", "timeout": datetime.timedelta(seconds=77)}]
