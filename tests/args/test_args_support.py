"""The field x backend decision table (xtrainer/args_support.py): complete, backed by real tests, current in
the docs, and enforced (a field without effect warns once; a refused one is an error)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import warnings

import pytest

import xtrainer
from xtrainer import args_support
from xtrainer.args_support import BACKENDS, SUPPORT, Acts, NoEffect, Refused
from helpers import RegressionModel

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_field_of_transformers_and_xtrainer_has_a_decision_on_every_backend():
    theirs = {f.name for cls in (transformers.TrainingArguments, transformers.Seq2SeqTrainingArguments)
              for f in dataclasses.fields(cls) if f.init}
    ours = set(args_support.all_field_names())
    assert sorted(theirs - ours) == []  # transformers grew a field xtrainer does not accept yet
    assert sorted((theirs | ours) - set(SUPPORT)) == []  # a field without a decision
    assert sorted(set(SUPPORT) - ours) == []  # a decision for a field that does not exist
    for name, decisions in SUPPORT.items():
        assert set(decisions) == set(BACKENDS), name


def test_every_acting_field_names_tests_that_exist():
    missing = []
    for name, decisions in SUPPORT.items():
        for backend, decision in decisions.items():
            if not isinstance(decision, Acts):
                continue
            assert decision.tests, f"{name} on {backend} acts but names no test"
            for test in decision.tests:
                path, function = test.split("::")
                source = open(os.path.join(ROOT, path)).read() if os.path.isfile(os.path.join(ROOT, path)) else ""
                if not re.search(rf"^def {re.escape(function)}\(", source, re.M):
                    missing.append(f"{name}/{backend}: {test}")
    assert missing == []


def test_docs_table_is_current():
    with open(os.path.join(ROOT, "docs", "training_arguments.md"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == args_support.markdown_table(), "run: PYTHONPATH=. python scripts/generate_docs.py"


def _first(kind, backend: str) -> str:
    return next(n for n, d in SUPPORT.items() if isinstance(d[backend], kind))


@pytest.mark.parametrize("backend", ["torch", "jax", "torch_xla"])
def test_a_field_without_effect_warns_once_naming_field_backend_and_alternative(tmp_path, backend, caplog):
    if backend == "torch_xla":
        pytest.importorskip("torch_xla")
    if backend == "jax":
        pytest.importorskip("flax")
        from flax import nnx

        from jax_models import RegressionMLP

        model = RegressionMLP(nnx.Rngs(0))
    else:
        model = RegressionModel()
    field = {"torch": "mesh", "jax": "torch_compile", "torch_xla": "torch_compile"}[backend]
    value = {"mesh": {"data": 1}, "torch_compile": True}[field]
    assert isinstance(SUPPORT[field][backend], NoEffect)
    args = xtrainer.TrainingArguments(str(tmp_path), backend=backend, report_to="none", **{field: value})
    with caplog.at_level(logging.WARNING, logger="xtrainer"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        xtrainer.Trainer(model=model, args=args)
    messages = [r.getMessage() for r in caplog.records if f"`{field}`" in r.getMessage()]
    assert len(messages) == 1
    assert not [w for w in caught if field in str(w.message)]  # no second warning from the backend itself
    assert f"backend={backend!r}" in messages[0] and SUPPORT[field][backend].instead in messages[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xtrainer"):
        xtrainer.Trainer(model=RegressionModel() if backend == "torch" else model,
                         args=xtrainer.TrainingArguments(str(tmp_path), backend=backend, report_to="none"))
    assert not [r for r in caplog.records if "has no effect" in r.getMessage()]


def test_refused_fields_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"`deepspeed`.*does not run DeepSpeed.*fsdp"):
        xtrainer.TrainingArguments(str(tmp_path), deepspeed={"zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match=r"`use_liger_kernel`.*Liger"):
        xtrainer.TrainingArguments(str(tmp_path), use_liger_kernel=True)
    assert isinstance(SUPPORT["fp16"]["torch_xla"], Refused)


def test_warning_texts_cover_every_backend():
    """Every no-effect decision says what to use instead (not an empty hint)."""
    for name, decisions in SUPPORT.items():
        for backend, decision in decisions.items():
            if isinstance(decision, NoEffect):
                assert len(decision.instead) > 15, (name, backend)
