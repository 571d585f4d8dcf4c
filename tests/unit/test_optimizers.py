"""xtrainer.optimizers: every transformers `optim` value has a row, get_optimizer_cls_and_kwargs is transformers'
own answer (class and kwargs, for every value whose library is installed), and unsupported values are refused
naming the backend and the alternatives. docs/optimizers.md is the generated table."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest

from xtrainer import TrainingArguments
from xtrainer.optimizers import (
    BACKENDS,
    SUPPORT,
    check_optimizer,
    get_optimizer_cls_and_kwargs,
    parse_optim_args,
    support_table_markdown,
    supported_optimizers,
)
from xtrainer.trainer_utils import OptimizerNames

torch = pytest.importorskip("torch")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
XTRAINER_ALIASES = {"adamw", "lion"}


class Tiny(torch.nn.Module):
    """Linear layers GaLore/APOLLO can target, an embedding (bitsandbytes keeps it 32-bit), a norm and biases."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(6, 8)
        self.q = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.out = torch.nn.Linear(8, 2, bias=False)


def test_every_transformers_optim_value_has_a_row():
    hf = pytest.importorskip("transformers.training_args").OptimizerNames
    ours = {m.name: m.value for m in OptimizerNames}
    assert {m.name: m.value for m in hf}.items() <= ours.items()
    assert set(ours.values()) - {m.value for m in hf} == XTRAINER_ALIASES
    assert set(SUPPORT) == set(OptimizerNames)
    assert all(set(row) == set(BACKENDS) for row in SUPPORT.values())
    assert all(entry.supported or entry.reason for row in SUPPORT.values() for entry in row.values())


def test_docs_table_is_generated_from_the_code():
    with open(os.path.join(ROOT, "docs", "optimizers.md")) as f:
        assert f.read() == support_table_markdown(), "regenerate it (the command is in its header)"


def _library_of(name: str) -> str | None:
    return SUPPORT[OptimizerNames(name)]["torch"].library


def _installed(name: str) -> bool:
    library = _library_of(name)
    modules = {"galore-torch": "galore_torch", "lomo-optim": "lomo_optim", "apollo-torch": "apollo_torch",
               "torch-optimi": "optimi"}
    return library is None or importlib.util.find_spec(modules.get(library, library)) is not None


def _normalise(kwargs: dict, model) -> dict:
    """kwargs with parameters/modules replaced by names, so two models' kwargs compare."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for key, value in kwargs.items():
        if key == "params":
            value = [{**g, "params": [names[id(p)] for p in g["params"]]} for g in value]
        elif key == "model":
            value = type(value).__name__
        elif key == "optimizer_dict":
            value = sorted((names[id(p)], type(o).__name__, o.defaults["lr"]) for p, o in value.items())
        out[key] = value
    return out


ALL_OPTIONS = "rank=2,update_proj_gap=3,alpha_init=0.9,beta3=0.999,t_alpha=10,max_lr=0.1,weight_lr_power=1.5,block_size=128"
TORCH_NAMES = [n for n in supported_optimizers("torch") if n not in XTRAINER_ALIASES]


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_get_optimizer_cls_and_kwargs_is_transformers(name):
    transformers = pytest.importorskip("transformers")
    if not _installed(name):
        pytest.skip(f"{_library_of(name)} is not installed in this lane")
    if name == "galore_adafactor_layerwise":
        pytest.skip("transformers fails to build it; test_galore_adafactor_layerwise_builds covers xtrainer's")
    kw = dict(optim=name, optim_args=ALL_OPTIONS, optim_target_modules=["q"], warmup_steps=3, weight_decay=0.1,
              learning_rate=3e-3, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, report_to="none")
    if name.startswith("rmsprop_bnb"):
        kw["optim_args"] = "alpha=0.9"  # transformers hands these raw to bitsandbytes' RMSprop
    theirs_model, ours_model = Tiny(), Tiny()
    theirs = transformers.Trainer.get_optimizer_cls_and_kwargs(transformers.TrainingArguments("/tmp/o", **kw),
                                                               theirs_model)
    ours = get_optimizer_cls_and_kwargs(TrainingArguments("/tmp/o", **kw), ours_model)
    assert ours[0] is theirs[0]
    assert _normalise(ours[1], ours_model) == _normalise(theirs[1], theirs_model)


def test_galore_adafactor_layerwise_builds():
    galore_torch = pytest.importorskip("galore_torch")
    model = Tiny()
    args = TrainingArguments("/tmp/o", optim="galore_adafactor_layerwise", optim_target_modules="all-linear",
                             optim_args="rank=2", report_to="none")
    cls, kwargs = get_optimizer_cls_and_kwargs(args, model)
    assert cls.__name__ == "LayerWiseDummyOptimizer"
    per_param = kwargs["optimizer_dict"]
    assert len(per_param) == len(list(model.parameters()))
    assert {type(o) for o in per_param.values()} == {galore_torch.GaLoreAdafactor}
    assert all(not o.defaults["relative_step"] for o in per_param.values())


def test_trainer_static_method_and_aliases():
    from xtrainer import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(TrainingArguments("/tmp/o", optim="sgd",
                                                                         optim_args="momentum=0.9, nesterov=true"))
    assert cls is torch.optim.SGD and kwargs == {"lr": 5e-05, "momentum": 0.9, "nesterov": True}
    cls, kwargs = get_optimizer_cls_and_kwargs(TrainingArguments("/tmp/o", optim="adamw"))
    assert cls is torch.optim.AdamW and kwargs == {"lr": 5e-05, "betas": (0.9, 0.999), "eps": 1e-08}


@pytest.mark.parametrize("name,needle", [
    ("galore_adamw", "optim_target_modules"),
    ("lomo", "needs the model"),
])
def test_arguments_transformers_requires(name, needle):
    if not _installed(name):
        pytest.skip(f"{_library_of(name)} is not installed in this lane")
    args = TrainingArguments("/tmp/o", optim=name, report_to="none")
    with pytest.raises(ValueError, match=needle):
        get_optimizer_cls_and_kwargs(args, None)


def test_low_rank_target_modules_match_as_in_transformers():
    pytest.importorskip("galore_torch")
    model = Tiny()
    for targets, expected in ((["q"], ["q.weight"]), (r"o.t", ["out.weight"]), ("all-linear", ["q.weight", "out.weight"])):
        args = TrainingArguments("/tmp/o", optim="galore_adamw", optim_target_modules=targets, report_to="none")
        fresh = copy.deepcopy(model)
        _, kwargs = get_optimizer_cls_and_kwargs(args, fresh)
        assert _normalise(kwargs, fresh)["params"][1]["params"] == expected, targets
    with pytest.raises(ValueError, match="no nn.Linear module matches"):
        get_optimizer_cls_and_kwargs(TrainingArguments("/tmp/o", optim="galore_adamw", optim_target_modules=["emb"],
                                                       report_to="none"), model)


UNSUPPORTED = [(name.value, backend) for name, row in SUPPORT.items() for backend, entry in row.items()
               if not entry.supported]


@pytest.mark.parametrize("name,backend", UNSUPPORTED, ids=[f"{n}-{b}" for n, b in UNSUPPORTED])
def test_unsupported_values_name_the_backend_and_alternatives(name, backend):
    with pytest.raises(ValueError) as err:
        check_optimizer(name, backend)
    message = str(err.value)
    assert f"optim='{name}' cannot run on backend='{backend}'" in message
    assert SUPPORT[OptimizerNames(name)][backend].reason in message
    alternatives = supported_optimizers(backend)
    assert alternatives and all(alt in message for alt in alternatives)
    elsewhere = [b for b in BACKENDS if SUPPORT[OptimizerNames(name)][b].supported]
    assert all(f"'{b}'" in message for b in elsewhere)


def test_cuda_only_values_are_refused_on_cpu():
    check_optimizer("galore_adamw_8bit", "torch", check_library=False)  # fine where the device is not known
    with pytest.raises(ValueError, match=r"cannot run on backend='torch' on cpu: it needs a cuda device"):
        check_optimizer("galore_adamw_8bit", "torch", "cpu")
    assert "galore_adamw_8bit" not in supported_optimizers("torch", "cpu")
    assert "galore_adamw_8bit" in supported_optimizers("torch", "cuda")


def test_missing_library_names_the_extra(monkeypatch):
    import xtrainer.optimizers as optimizers

    monkeypatch.setattr(optimizers, "_library_installed", lambda library: False)
    with pytest.raises(ImportError, match=r"needs the `schedulefree` package: pip install 'xtrainer\[optimizers\]'"):
        check_optimizer("schedule_free_adamw", "torch")
    with pytest.raises(ImportError, match="grokadamw"):
        get_optimizer_cls_and_kwargs(TrainingArguments("/tmp/o", optim="grokadamw", report_to="none"))
    check_optimizer("adamw_torch", "torch")  # no library needed


def test_optim_args_parsing():
    assert parse_optim_args(" a=1 , b=x") == {"a": "1", "b": "x"}
    assert parse_optim_args(None) == {} and parse_optim_args("") == {}
    with pytest.raises(ValueError, match="key=value"):
        parse_optim_args("momentum")
