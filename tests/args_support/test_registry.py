"""The field x backend decision table (xtrainer/args_support.py): complete, backed by tests, documented,
and the no-effect warnings it drives (one per field per run, naming the field, the backend and what instead)."""

import ast
import dataclasses
import logging
import os
import types
import warnings

import pytest

import xtrainer
from field_probes import backend_params, make_trainer, rows
from xtrainer import args_support
from xtrainer.args_support import BACKEND_NAMES, PENDING_TESTS, SUPPORT, Acts, NoEffect, Refused

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_field_has_a_decision_on_every_backend():
    names = [f.name for f in dataclasses.fields(xtrainer.Seq2SeqTrainingArguments)]
    assert sorted(SUPPORT) == sorted(names)
    for name, per_backend in SUPPORT.items():
        assert set(per_backend) == set(BACKEND_NAMES), name
        for backend, choice in per_backend.items():
            assert isinstance(choice, (Acts, NoEffect, Refused)), (name, backend)
            if isinstance(choice, NoEffect):
                assert choice.why and choice.instead, (name, backend)
            else:
                assert choice.tests, (name, backend)


def _test_functions(path: str) -> tuple[set[str], str]:
    source = open(os.path.join(ROOT, path)).read()
    tree = ast.parse(source)
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test")}, source


def test_every_acting_decision_names_tests_that_exist():
    """Each test id is a file (or file::test[params]) in this tree; params must be parametrisations the file makes.

    Ids in files listed in PENDING_TESTS are tests other branches add (the lead empties the list after merging).
    """
    missing = []
    for test_id in sorted(args_support.all_test_ids()):
        path, _, rest = test_id.partition("::")
        if path in PENDING_TESTS:
            continue
        if not os.path.isfile(os.path.join(ROOT, path)):
            missing.append(test_id)
            continue
        if not rest:
            continue
        function, _, params = rest.partition("[")
        functions, source = _test_functions(path)
        if function not in functions:
            missing.append(test_id)
            continue
        for param in filter(None, params.rstrip("]").split("-")):
            if param not in BACKEND_NAMES and f'"{param}"' not in source:
                missing.append(test_id)
    assert missing == []


def test_pending_tests_are_only_the_ones_other_branches_add():
    referenced = {t.partition("::")[0] for t in args_support.all_test_ids()}
    assert PENDING_TESTS <= referenced
    # Once a pending file is in the tree, it must leave PENDING_TESTS (so its ids are checked like the others).
    assert [p for p in PENDING_TESTS if os.path.exists(os.path.join(ROOT, p))] == []


def test_the_docs_table_is_up_to_date():
    path = os.path.join(ROOT, "docs", "training_arguments.md")
    with open(path, encoding="utf-8") as f:
        committed = f.read()
    assert committed == args_support.markdown_table(), (
        "docs/training_arguments.md is out of date: python -m xtrainer.args_support > docs/training_arguments.md")
    counts = args_support.summary()
    assert all(sum(c.values()) == len(SUPPORT) for c in counts.values())


# A non-default value for every field that has no effect somewhere (the 4.x names are mapped when built,
# and say so in their DeprecationWarning; their 5.x fields warn here).
SAMPLES = {
    "average_tokens_across_devices": False, "tf32": False, "activation_checkpointing_kwargs": {"use_reentrant": False},
    "gradient_checkpointing_kwargs": None, "torch_compile": True, "torch_compile_backend": "aot_eager",
    "torch_compile_mode": "max-autotune", "liger_kernel_config": {"rms_norm": True}, "project": "mine",
    "trackio_space_id": "me/space", "trackio_bucket_id": "bucket", "trackio_static_space_id": "me/static",
    "eval_use_gather_object": True, "save_on_each_node": True, "use_cpu": True,
    "accelerator_config": {"split_batches": True}, "parallelism_config": types.SimpleNamespace(tp_size=2),
    "ddp_find_unused_parameters": True, "ddp_bucket_cap_mb": 10, "ddp_broadcast_buffers": False,
    "ddp_static_graph": True, "ddp_backend": "gloo", "ddp_timeout": 60, "debug": "tpu_metrics_debug", "local_rank": 2,
    "mesh": {"data": -1}, "tpu_config": "v5e-1", "sharding_rules": [["kernel", [None, "data"]]],
    "jax_compilation_cache_dir": "/tmp/xtrainer-jax-cache", "xla_pad_batches": False, "xla_seq_bucket": "none",
    "xla_max_graphs": 3, "xla_on_recompile": "raise", "allow_unsafe_checkpoint_load": True,
}
ALIASES = {"overwrite_output_dir", "no_cuda", "tpu_num_cores"}


@pytest.mark.parametrize("backend", backend_params())
def test_each_no_effect_field_warns_once_naming_field_backend_and_instead(tmp_path, backend, caplog, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    inert = [n for n, per in SUPPORT.items() if isinstance(per[backend], NoEffect) and n not in ALIASES]
    assert set(inert) - {"gradient_checkpointing_kwargs"} <= set(SAMPLES)
    kwargs = {n: SAMPLES[n] for n in inert if SAMPLES.get(n) is not None}
    args = xtrainer.Seq2SeqTrainingArguments(str(tmp_path), backend=backend, **kwargs)
    monkeypatch.setattr(args_support, "_apply_torch_settings", lambda *a: None)  # no process-wide torch switches here
    with caplog.at_level(logging.WARNING, logger="xtrainer"):
        messages = args_support.apply_to_run(args, backend)
    expected = sorted(kwargs)
    assert sorted(m.split("=", 1)[0].removeprefix("TrainingArguments.") for m in messages) == expected
    for message in messages:
        name = message.split("=", 1)[0].removeprefix("TrainingArguments.")
        choice = SUPPORT[name][backend]
        assert f"backend={backend!r}" in message and choice.instead in message and choice.why in message
        assert caplog.text.count(message) == 1


@pytest.mark.parametrize("backend", backend_params())
def test_defaults_warn_about_nothing(tmp_path, backend):
    args = xtrainer.TrainingArguments(str(tmp_path), backend=backend)
    assert args_support.inert_settings(args, backend) == []


def test_a_trainer_warns_once_per_run(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="xtrainer"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer("torch", tmp_path, mesh={"data": 2}, torch_compile=False, max_steps=2,
                               train_dataset=rows(8))
        trainer.train()
    hits = [r for r in caplog.records if "TrainingArguments.mesh=" in r.getMessage()]
    assert len(hits) == 1 and "backend='torch'" in hits[0].getMessage()
    assert "torchrun --nproc_per_node=N" in hits[0].getMessage()
