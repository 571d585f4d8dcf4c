"""TrainingArguments against transformers 5.x: field order, defaults and help, HfArgumentParser actions,
to_dict / to_json_string / to_sanitized_dict / str, setters and process methods (compared value by value)."""

import dataclasses
import json

import pytest

from xtrainer.trainer_utils import IntervalStrategy
from xtrainer.training_args import Seq2SeqTrainingArguments, TrainingArguments

transformers = pytest.importorskip("transformers")

# Fields both classes define whose defaults differ on purpose (name -> reason). Empty: every field of
# transformers 5 exists here with its default.
INTENTIONAL_DEFAULT_DIFFERENCES: dict[str, str] = {}
# transformers before activation_checkpointing (the XLA lane's 5.15) has gradient_checkpointing as a plain
# bool field; here it is the later 5.x alias (None = "not given"), which accepts the same values.
HAS_ACTIVATION_CHECKPOINTING = "activation_checkpointing" in {
    f.name for f in dataclasses.fields(transformers.TrainingArguments)}
VERSION_DIFFERENCES = set() if HAS_ACTIVATION_CHECKPOINTING else {"gradient_checkpointing"}


def make(**kwargs):
    kwargs.setdefault("output_dir", "/tmp/xtrainer-test-out")
    return TrainingArguments(**kwargs)


# ---------------------------------------------------------------- every field of transformers, parsed alike


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


@pytest.mark.parametrize("ours, theirs", [
    (TrainingArguments, "TrainingArguments"), (Seq2SeqTrainingArguments, "Seq2SeqTrainingArguments"),
])
def test_every_transformers_field_is_a_field_here_with_its_default(ours, theirs):
    """A field transformers adds upstream fails here until it is added (with its default) and decided per backend."""
    from xtrainer.args_support import SUPPORT

    mine = {f.name: f for f in dataclasses.fields(ours)}
    upstream = dataclasses.fields(getattr(transformers, theirs))
    missing = [f.name for f in upstream if f.name not in mine]
    assert missing == []
    wrong = {f.name: (_default(mine[f.name]), _default(f)) for f in upstream
             if _default(mine[f.name]) != _default(f) and f.name not in {*INTENTIONAL_DEFAULT_DIFFERENCES,
                                                                            *VERSION_DIFFERENCES}}
    assert wrong == {}
    assert [f.name for f in upstream if f.name not in SUPPORT] == []  # every field has per-backend decisions
    # Same order as transformers (so --help and to_dict read alike); xtrainer's own fields come after them.
    assert [n for n in mine if n in {f.name for f in upstream}] == [f.name for f in upstream]
    assert all(mine[name].metadata.get("help") for name in mine)  # every field has --help text


# Choice lists that differ from transformers' (name -> why); the parser refuses the values xtrainer lacks and
# names the valid ones. Remove an entry once the lists agree.
CHOICES_PENDING = {
    "optim": "xtrainer implements a subset of transformers' optimizers (and names a few of its own)",
    "lr_scheduler_type": "xtrainer lacks 'cosine_warmup_with_min_lr' and 'greedy'",
}
# Fields whose parser type differs on purpose (name -> why).
PARSER_TYPE_DIFFERENCES = {
    "parallelism_config": "transformers types it as accelerate's ParallelismConfig, which would import torch and "
                          "accelerate with xtrainer; neither class can be built from a command-line string",
}


def _parser_actions(cls):
    out = {}
    for action in transformers.HfArgumentParser(cls)._actions:
        if action.dest == "help":
            continue
        kind = getattr(action.type, "__qualname__", None)
        out[action.dest] = {
            "option_strings": tuple(action.option_strings), "nargs": action.nargs, "const": action.const,
            "required": action.required, "default": getattr(action.default, "value", action.default),
            "choices": None if action.choices is None else [getattr(c, "value", c) for c in action.choices],
            # Enum fields get a closure per class; compare what it does through the choices instead.
            "type": "enum" if kind and "make_choice_type_function" in kind else
                    getattr(action.type, "__name__", None) if action.type is not None else None,
        }
    return out


@pytest.mark.parametrize("ours, theirs", [
    (TrainingArguments, "TrainingArguments"), (Seq2SeqTrainingArguments, "Seq2SeqTrainingArguments"),
])
def test_hf_argument_parser_sees_every_field_as_for_transformers(ours, theirs):
    mine, upstream = _parser_actions(ours), _parser_actions(getattr(transformers, theirs))
    differences = {}
    for dest, expected in upstream.items():
        if dest in VERSION_DIFFERENCES:
            continue
        got = dict(mine[dest])
        want = dict(expected)
        if dest in CHOICES_PENDING:
            got["choices"] = want["choices"]
        if dest in PARSER_TYPE_DIFFERENCES:
            got["type"] = want["type"]
        if dest == "train_sampling_strategy" and "batch_rebalance" in want["choices"]:
            # transformers 5.24's 'batch_rebalance' gives micro-batches of varying sizes; xtrainer refuses it.
            assert set(got["choices"]) == set(want["choices"]) - {"batch_rebalance"}
            got["choices"] = want["choices"]
        if got != want:
            differences[dest] = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert differences == {}


# ---------------------------------------------------------------- serialisation equal to transformers'

SERIALISATION_CASES = [
    {},
    {"eval_strategy": "steps", "eval_steps": 20, "save_strategy": "steps", "save_steps": 40,
     "load_best_model_at_end": True, "metric_for_best_model": "accuracy", "lr_scheduler_type": "cosine",
     "hub_strategy": "checkpoint", "hub_token": "secret", "report_to": ["tensorboard"], "debug": "underflow_overflow",
     "include_num_input_tokens_seen": True, "warmup_steps": 0.1, "torch_compile_mode": "reduce-overhead"},
    {"accelerator_config": {"split_batches": True, "even_batches": False}, "lr_scheduler_kwargs": '{"num_cycles": "2"}',
     **({"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}}
        if HAS_ACTIVATION_CHECKPOINTING else {"gradient_checkpointing_kwargs": {"use_reentrant": False}}),
     "optim": "adafactor", "optim_args": "scale_parameter=False", "label_names": ["labels", "aux"],
     "include_for_metrics": ["inputs", "loss"], "dataloader_num_workers": 2, "dataloader_prefetch_factor": 4,
     "dataloader_multiprocessing_context": "spawn", "use_cpu": True, "log_level": "info", "seed": 7},
]


def _without_xtrainer_fields(d: dict, theirs: dict) -> dict:
    return {k: v for k, v in d.items() if k in theirs}


@pytest.mark.parametrize("kwargs", SERIALISATION_CASES, ids=["defaults", "strategies", "dicts"])
def test_to_dict_and_to_json_string_equal_transformers(tmp_path, kwargs):
    ours = TrainingArguments(output_dir=str(tmp_path), **kwargs)
    theirs = transformers.TrainingArguments(output_dir=str(tmp_path), **kwargs)
    expected = theirs.to_dict()
    assert _without_xtrainer_fields(ours.to_dict(), expected) == expected
    assert set(ours.to_dict()) - set(expected) <= {f.name for f in dataclasses.fields(TrainingArguments)}
    # Same keys in the same order: the JSON text of the shared fields is transformers' byte for byte.
    shared = json.loads(ours.to_json_string())
    assert json.dumps(_without_xtrainer_fields(shared, expected), indent=2) == theirs.to_json_string()


def test_dtype_entries_serialise_as_names(tmp_path):
    torch = pytest.importorskip("torch")

    @dataclasses.dataclass
    class WithDtype(TrainingArguments):
        dtype: torch.dtype = torch.float32
        model_init_kwargs: dict | None = None

    args = WithDtype(output_dir=str(tmp_path), dtype=torch.bfloat16, model_init_kwargs={"dtype": torch.float16})
    d = args.to_dict()
    assert d["dtype"] == "bfloat16" and d["model_init_kwargs"] == {"dtype": "float16"}
    assert json.loads(args.to_json_string())["dtype"] == "bfloat16"


def test_accelerator_config_forms(tmp_path):
    from xtrainer.accelerator_config import AcceleratorConfig

    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"split_batches": True}))
    assert make(accelerator_config=str(path)).accelerator_config.split_batches is True
    assert make(accelerator_config='{"even_batches": "false"}').accelerator_config.even_batches is False
    given = AcceleratorConfig(non_blocking=True)
    assert make(accelerator_config=given).accelerator_config is given
    with pytest.raises(ValueError, match="unknown keys.*'splt_batches'"):
        make(accelerator_config={"splt_batches": True})
    with pytest.raises(NotImplementedError, match="instance"):  # the class itself, as transformers refuses it
        make(accelerator_config=AcceleratorConfig)


# ---------------------------------------------------------------- methods against transformers'

SETTER_CALLS = [
    ("set_training", {"learning_rate": 1e-4, "batch_size": 32, "weight_decay": 0.01, "num_epochs": 2, "seed": 3}),
    ("set_evaluate", {"strategy": "steps", "steps": 100, "batch_size": 16, "accumulation_steps": 2, "delay": 1.0}),
    ("set_testing", {"batch_size": 4, "loss_only": True}),
    ("set_save", {"strategy": "epoch", "total_limit": 2, "on_each_node": True}),
    ("set_logging", {"strategy": "steps", "steps": 10, "report_to": "none", "level": "info", "first_step": True}),
    ("set_push_to_hub", {"model_id": "me/model", "strategy": "end", "token": "t", "always_push": True}),
    ("set_optimizer", {"name": "adafactor", "learning_rate": 1e-3, "beta1": 0.8, "epsilon": 1e-6}),
    ("set_lr_scheduler", {"name": "cosine", "num_epochs": 5, "warmup_steps": 0.05}),
    ("set_dataloader", {"train_batch_size": 16, "eval_batch_size": 64, "drop_last": True, "num_workers": 2,
                        "prefetch_factor": 2, "in_order": False, "sampler_seed": 11, "ignore_data_skip": True}),
]


@pytest.mark.parametrize("name, kwargs", SETTER_CALLS, ids=[c[0] for c in SETTER_CALLS])
def test_setters_set_what_transformers_sets(tmp_path, name, kwargs):
    ours, theirs = TrainingArguments(output_dir=str(tmp_path)), transformers.TrainingArguments(output_dir=str(tmp_path))
    assert getattr(ours, name)(**kwargs) is ours  # chainable
    getattr(theirs, name)(**kwargs)
    expected = theirs.to_dict()
    assert _without_xtrainer_fields(ours.to_dict(), expected) == expected
    for key in ("strategy", "name"):  # an unknown strategy or name fails, as in transformers
        if key in kwargs:
            with pytest.raises(ValueError):
                getattr(ours, name)(**{**kwargs, key: "no_such"})


def test_process_methods_equal_transformers_on_one_cpu_process(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    kwargs = dict(output_dir=str(tmp_path), warmup_steps=0.15, log_level="error", log_level_replica="debug")
    ours, theirs = TrainingArguments(backend="torch", **kwargs), transformers.TrainingArguments(**kwargs)
    assert ours.get_warmup_steps(33) == theirs.get_warmup_steps(33) == 5
    assert ours.get_process_log_level() == theirs.get_process_log_level() == 40
    assert ours.ddp_timeout_delta == theirs.ddp_timeout_delta
    sanitized, expected = ours.to_sanitized_dict(), theirs.to_sanitized_dict()
    assert _without_xtrainer_fields(sanitized, expected) == expected
    with ours.main_process_first(desc="map"), theirs.main_process_first(desc="map"):
        pass  # one process: nothing to wait for


def test_batch_rebalance_is_refused_by_name():
    with pytest.raises(ValueError, match="train_sampling_strategy.*batch_rebalance"):
        make(train_sampling_strategy="batch_rebalance")


def test_script_flags_are_kept_for_the_script():
    args = make(do_train=True, do_predict=True)
    assert (args.do_train, args.do_eval, args.do_predict) == (True, False, True)
    assert make(eval_strategy="epoch").do_eval is True  # an eval strategy implies do_eval, as in transformers
    assert make(do_eval=True).eval_strategy is IntervalStrategy.NO  # and not the other way round

    assert make(torch_empty_cache_steps=3).torch_empty_cache_steps == 3


def test_debug_and_hub_strategy_become_enums():
    from xtrainer.trainer_utils import DebugOption
    from xtrainer.trainer_utils import HubStrategy

    args = make(debug="underflow_overflow tpu_metrics_debug", hub_strategy="end")
    assert args.debug == [DebugOption.UNDERFLOW_OVERFLOW, DebugOption.TPU_METRICS_DEBUG]
    assert args.hub_strategy is HubStrategy.END
    assert make(debug=None).debug == [] and make().debug == []
    with pytest.raises(ValueError, match="debug"):
        make(debug="everything")
