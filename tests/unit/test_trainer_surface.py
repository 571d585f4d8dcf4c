"""Every public member of transformers' Trainer and Seq2SeqTrainer exists on xtrainer's, with the same signature.

The lists are read from the installed transformers, so a member it gains fails this test until xtrainer
has it too.
"""

from __future__ import annotations

import inspect

import pytest

import xtrainer

transformers = pytest.importorskip("transformers")

# The protected hooks users override, checked with the public members.
PROTECTED_HOOKS = ("_save", "_load_from_checkpoint", "_prepare_inputs", "_maybe_log_save_evaluate")


def _public_members(cls) -> list[str]:
    return sorted(n for n in dir(cls) if not n.startswith("_"))


def _parameters(func) -> list[tuple[str, str, str]]:
    """(name, kind, default) of each parameter; annotations differ between the libraries on purpose."""
    sig = inspect.signature(func)
    return [(p.name, p.kind.name, repr(p.default)) for p in sig.parameters.values()]


@pytest.mark.parametrize("pair", [("Trainer", "Trainer"), ("Seq2SeqTrainer", "Seq2SeqTrainer")])
def test_every_public_member_exists_with_the_same_signature(pair):
    theirs, ours = getattr(transformers, pair[0]), getattr(xtrainer, pair[1])
    names = _public_members(theirs) + list(PROTECTED_HOOKS)
    missing = [n for n in names if not hasattr(ours, n)]
    assert missing == []
    different = {}
    for name in names:
        their_attr, our_attr = inspect.getattr_static(theirs, name), inspect.getattr_static(ours, name)
        if isinstance(their_attr, property):
            assert isinstance(our_attr, property) or not callable(our_attr), name
            continue
        if not callable(getattr(theirs, name)):
            continue
        their_params = _parameters(getattr(theirs, name))
        takes_self = bool(their_params) and their_params[0][0] == "self"
        if isinstance(their_attr, staticmethod) and not isinstance(our_attr, staticmethod):
            different[name] = "a staticmethod in transformers only"
            continue
        if isinstance(our_attr, staticmethod) and takes_self:
            different[name] = "a staticmethod here, a method in transformers"
            continue
        if not _same_signature(_parameters(getattr(theirs, name)), _parameters(getattr(ours, name))):
            different[name] = (_parameters(getattr(theirs, name)), _parameters(getattr(ours, name)))
    assert different == {}


# The signatures follow the newest transformers 5.x the main lane installs. An older 5.x (the XLA lane
# pins the Colab runtime's) lacks parameters added since; those are optional here, so a script written
# for the older release still calls them the same way.
REFERENCE_TRANSFORMERS = (5, 24)


def _same_signature(theirs, ours) -> bool:
    if theirs == ours:
        return True
    installed = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    if installed >= REFERENCE_TRANSFORMERS:
        return False
    their_names = {p[0] for p in theirs}
    added_later = [p for p in ours if p[0] not in their_names]
    return all(p[2] != repr(inspect.Parameter.empty) for p in added_later) and [
        p for p in ours if p[0] in their_names
    ] == theirs


@pytest.mark.parametrize("name", ["Trainer", "Seq2SeqTrainer"])
def test_init_signature(name):
    theirs, ours = _parameters(getattr(transformers, name).__init__), _parameters(getattr(xtrainer, name).__init__)
    if name == "Trainer":  # transformers 4's `tokenizer=` is still accepted, with a DeprecationWarning
        assert ours[-1] == ("deprecated", "VAR_KEYWORD", repr(inspect.Parameter.empty))
        ours = ours[:-1]
    assert ours == theirs


def test_instance_attributes(tmp_path):
    from helpers import RegressionModel

    args_theirs = transformers.TrainingArguments(str(tmp_path / "hf"), report_to="none", use_cpu=True)
    theirs = transformers.Trainer(model=RegressionModel(), args=args_theirs)
    ours = xtrainer.Trainer(model=RegressionModel(), args=xtrainer.TrainingArguments(str(tmp_path / "x"), backend="torch"))
    public = sorted(k for k in vars(theirs) if not k.startswith("_"))
    assert [k for k in public if not hasattr(ours, k)] == []
    # Same meaning where both libraries run the same thing.
    for name in ("optimizer", "lr_scheduler", "optimizer_cls_and_kwargs", "hp_search_backend", "is_in_train",
                 "compute_loss_func", "is_deepspeed_enabled", "is_fsdp_enabled", "label_smoother",
                 "model_accepts_loss_kwargs", "can_return_loss", "neftune_noise_alpha", "label_names"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.model_wrapped is ours.model
    assert xtrainer.Trainer.loss_is_scaled_for_ga is None
