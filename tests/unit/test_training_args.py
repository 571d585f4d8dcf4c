"""TrainingArguments / Seq2SeqTrainingArguments: transformers-5 parity, v4 aliases, validation, parsing."""

import dataclasses
import json
import warnings

import pytest

from xtrainer.trainer_utils import IntervalStrategy, OptimizerNames, SaveStrategy, SchedulerType, TrainSamplingStrategy
from xtrainer.training_args import Seq2SeqTrainingArguments, TrainingArguments

transformers = pytest.importorskip("transformers")

# Fields both classes define whose defaults differ on purpose (name -> reason). Empty: every shared field
# matches transformers 5. (xtrainer skips several v5 fields entirely, e.g. hub_*, trackio_*, accelerator_config,
# deepspeed, debug; those are not compared.)
INTENTIONAL_DEFAULT_DIFFERENCES: dict[str, str] = {}


def make(**kwargs):
    kwargs.setdefault("output_dir", "/tmp/xtrainer-test-out")
    return TrainingArguments(**kwargs)


# ---------------------------------------------------------------- parity with transformers


def test_defaults_match_transformers(tmp_path):
    ours = TrainingArguments(output_dir=str(tmp_path)).to_dict()
    theirs = transformers.TrainingArguments(output_dir=str(tmp_path)).to_dict()
    shared = sorted(set(ours) & set(theirs))
    assert len(shared) >= 80, shared
    mismatches = {
        k: (ours[k], theirs[k]) for k in shared if ours[k] != theirs[k] and k not in INTENTIONAL_DEFAULT_DIFFERENCES
    }
    assert mismatches == {}


def test_fields_named_in_spec_exist():
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    theirs = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    required = {
        "output_dir", "do_train", "do_eval", "do_predict", "eval_strategy", "prediction_loss_only",
        "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
        "eval_accumulation_steps", "eval_delay", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2",
        "adam_epsilon", "max_grad_norm", "num_train_epochs", "max_steps", "lr_scheduler_type",
        "lr_scheduler_kwargs", "warmup_steps", "log_level", "logging_strategy", "logging_first_step",
        "logging_steps", "logging_nan_inf_filter", "save_strategy", "save_steps", "save_total_limit",
        "save_only_model", "use_cpu", "seed", "data_seed", "bf16", "fp16", "bf16_full_eval", "fp16_full_eval",
        "tf32", "local_rank", "ddp_backend", "dataloader_drop_last", "eval_steps", "dataloader_num_workers",
        "run_name", "disable_tqdm", "remove_unused_columns", "label_names", "load_best_model_at_end",
        "metric_for_best_model", "greater_is_better", "ignore_data_skip", "fsdp", "fsdp_config", "optim",
        "optim_args", "report_to", "resume_from_checkpoint", "gradient_checkpointing",
        "gradient_checkpointing_kwargs", "include_for_metrics", "eval_do_concat_batches", "torch_compile",
        "torch_compile_backend", "torch_compile_mode", "eval_on_start", "batch_eval_metrics",
        "average_tokens_across_devices", "train_sampling_strategy", "length_column_name",
        "label_smoothing_factor", "include_num_input_tokens_seen", "restore_callback_states_from_checkpoint",
        "full_determinism", "dataloader_persistent_workers", "dataloader_pin_memory", "dataloader_prefetch_factor",
    }
    assert required <= theirs  # the spec only names fields transformers 5 has
    assert required <= names
    assert {"backend", "mesh", "tpu_config", "sharding_rules", "jax_compilation_cache_dir"} <= names


def test_v5_defaults_and_enum_conversion():
    args = make(eval_strategy="steps", save_strategy="epoch", lr_scheduler_type="cosine", optim="adafactor")
    assert TrainingArguments().output_dir == "trainer_output"
    assert args.optim is OptimizerNames.ADAFACTOR
    assert args.lr_scheduler_type is SchedulerType.COSINE
    assert args.eval_strategy is IntervalStrategy.STEPS and args.save_strategy is SaveStrategy.EPOCH
    assert args.train_sampling_strategy is TrainSamplingStrategy.RANDOM
    assert make().optim is OptimizerNames.ADAMW_TORCH_FUSED
    # eval_steps falls back to logging_steps; do_eval is switched on by an eval strategy.
    assert args.eval_steps == 500 and args.do_eval is True
    assert make(eval_strategy="steps", logging_steps=7).eval_steps == 7
    assert make(eval_steps=0.25, eval_strategy="steps").eval_steps == 0.25  # ratios allowed
    assert make(save_steps=3.0).save_steps == 3 and isinstance(make(save_steps=3.0).save_steps, int)
    assert make().report_to == [] and make(report_to="tensorboard").report_to == ["tensorboard"]
    assert make(include_num_input_tokens_seen=True).include_num_input_tokens_seen == "all"
    compiled = make(torch_compile_mode="reduce-overhead")
    assert compiled.torch_compile and compiled.torch_compile_backend == "inductor"
    assert make(use_cpu=True).dataloader_pin_memory is False


def test_best_model_metric_defaults():
    args = make(load_best_model_at_end=True, eval_strategy="steps", save_steps=500)
    assert args.metric_for_best_model == "loss" and args.greater_is_better is False
    acc = make(
        load_best_model_at_end=True, eval_strategy="epoch", save_strategy="epoch", metric_for_best_model="accuracy"
    )
    assert acc.greater_is_better is True
    assert make(metric_for_best_model="eval_loss").greater_is_better is False
    best = make(eval_strategy="epoch", save_strategy="best", metric_for_best_model="f1")
    assert best.save_strategy is SaveStrategy.BEST and best.greater_is_better is True


def test_warmup_steps_and_ratio():
    assert make(warmup_steps=10).get_warmup_steps(1000) == 10
    assert make(warmup_steps=0.1).get_warmup_steps(1000) == 100
    assert make(warmup_steps=0.1).get_warmup_steps(15) == 2  # rounded up, as transformers
    assert make().get_warmup_steps(1000) == 0


def test_process_properties(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    args = make(per_device_train_batch_size=4, per_device_eval_batch_size=16)
    assert (args.train_batch_size, args.eval_batch_size) == (4, 16)
    assert (args.world_size, args.process_index, args.local_process_index) == (1, 0, 0)
    assert args.should_log and args.should_save
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (args.world_size, args.process_index, args.local_process_index) == (8, 5, 1)
    assert not args.should_log and not args.should_save
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert args.should_log and not args.should_save  # logs per node, saves on process 0 only
    levels = make(log_level="error", log_level_replica="info")
    assert levels.get_process_log_level() == 40  # a node's main process uses log_level
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert levels.get_process_log_level() == 20  # replicas use log_level_replica


# ---------------------------------------------------------------- v4 aliases


@pytest.mark.parametrize(
    "kwargs, attr, expected",
    [
        ({"warmup_ratio": 0.1}, "warmup_steps", 0.1),
        ({"evaluation_strategy": "steps"}, "eval_strategy", IntervalStrategy.STEPS),
        ({"group_by_length": True}, "train_sampling_strategy", TrainSamplingStrategy.GROUP_BY_LENGTH),
        ({"gradient_checkpointing": True}, "activation_checkpointing", True),
        ({"gradient_checkpointing_kwargs": {"use_reentrant": False}}, "activation_checkpointing_kwargs",
         {"use_reentrant": False}),
        ({"tpu_num_cores": 8}, "mesh", {"data": 8}),
        ({"overwrite_output_dir": True}, "overwrite_output_dir", None),
        ({"no_cuda": True}, "use_cpu", True),
        ({"logging_dir": "/tmp/tb"}, "logging_dir", "/tmp/tb"),
    ],
)
def test_v4_alias_warns_and_maps(kwargs, attr, expected):
    old = next(iter(kwargs))
    with pytest.warns(DeprecationWarning, match=old) as record:
        args = make(**kwargs)
    assert getattr(args, attr) == expected
    if attr != old:
        assert any(attr.split("_")[0] in str(w.message) for w in record)  # names the replacement too


def test_gradient_checkpointing_attribute_mirrors_new_name():
    with pytest.warns(DeprecationWarning):
        args = make(gradient_checkpointing=True)
    assert args.gradient_checkpointing is True and args.activation_checkpointing is True
    plain = make(activation_checkpointing=True)
    assert plain.gradient_checkpointing is True
    assert make().gradient_checkpointing is False


def test_no_warning_without_aliases_and_roundtrip():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = make(activation_checkpointing=True, eval_strategy="epoch", save_strategy="epoch",
                    load_best_model_at_end=True, mesh={"data": -1})
        again = TrainingArguments(**args.to_dict())
        replaced = dataclasses.replace(args, learning_rate=1e-3)
    assert again.to_dict() == args.to_dict()
    assert replaced.learning_rate == 1e-3 and replaced.gradient_checkpointing is True


def test_alias_conflicts_raise():
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="evaluation_strategy"):
        make(evaluation_strategy="steps", eval_strategy="epoch")
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="tpu_num_cores"):
        make(tpu_num_cores=8, mesh={"data": 4})
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="warmup_ratio"):
        make(warmup_ratio=1.5)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="group_by_length"):
        make(group_by_length=True, train_sampling_strategy="sequential")


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, names",
    [
        ({"load_best_model_at_end": True, "eval_strategy": "epoch"}, ["load_best_model_at_end", "save_strategy"]),
        ({"load_best_model_at_end": True, "save_strategy": "no"}, ["load_best_model_at_end", "save_strategy"]),
        ({"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 30, "save_steps": 100},
         ["save_steps", "eval_steps"]),
        ({"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 0.1, "save_steps": 100},
         ["save_steps", "eval_steps"]),
        ({"save_strategy": "best", "eval_strategy": "epoch"}, ["metric_for_best_model"]),
        ({"save_strategy": "best", "metric_for_best_model": "f1"}, ["eval_strategy"]),
        ({"fp16": True, "bf16": True}, ["fp16", "bf16"]),
        ({"fp16_full_eval": True, "bf16_full_eval": True}, ["fp16_full_eval", "bf16_full_eval"]),
        ({"max_steps": -5}, ["max_steps"]),
        ({"logging_steps": -1}, ["logging_steps"]),
        ({"logging_steps": 0}, ["logging_steps"]),
        ({"logging_steps": 2.5}, ["logging_steps"]),
        ({"eval_strategy": "steps", "eval_steps": -3}, ["eval_steps"]),
        ({"save_steps": -1}, ["save_steps"]),
        ({"num_train_epochs": -1}, ["num_train_epochs"]),
        ({"gradient_accumulation_steps": 0}, ["gradient_accumulation_steps"]),
        ({"per_device_train_batch_size": 0}, ["per_device_train_batch_size"]),
        ({"per_device_eval_batch_size": 0}, ["per_device_eval_batch_size"]),
        ({"warmup_steps": -1}, ["warmup_steps"]),
        ({"optim": "adamw_9bit"}, ["optim", "adamw_torch_fused", "lion_32bit"]),
        ({"lr_scheduler_type": "cosine_wobble"}, ["lr_scheduler_type", "cosine_with_restarts"]),
        ({"eval_strategy": "sometimes"}, ["eval_strategy", "'steps'", "'epoch'"]),
        ({"save_strategy": "often"}, ["save_strategy", "'best'"]),
        ({"train_sampling_strategy": "batch_rebalance"}, ["train_sampling_strategy", "group_by_length"]),
        ({"backend": "tensorflow"}, ["backend", "jax", "torch_xla"]),
        ({"lr_scheduler_type": "reduce_lr_on_plateau"}, ["reduce_lr_on_plateau", "eval_strategy"]),
        ({"dataloader_prefetch_factor": 2}, ["dataloader_prefetch_factor", "dataloader_num_workers"]),
        ({"log_level": "loud"}, ["log_level"]),
        ({"include_for_metrics": ["labels"]}, ["include_for_metrics"]),
        ({"mesh": {"data": 2, "pipeline": 2}}, ["mesh", "pipeline"]),
        ({"mesh": {"data": 0}}, ["mesh", "data"]),
        ({"mesh": {"data": -1, "fsdp": -1}}, ["mesh", "-1"]),
        ({"mesh": {"data": 1.5}}, ["mesh"]),
        ({"mesh": "data=2"}, ["mesh"]),
        ({"sharding_rules": [["(unclosed", [None]]]}, ["sharding_rules"]),
        ({"sharding_rules": [["kernel", "fsdp"]]}, ["sharding_rules"]),
        ({"sharding_rules": "not json"}, ["sharding_rules"]),
    ],
)
def test_validation_error_names_argument(kwargs, names):
    with pytest.raises(ValueError) as excinfo:
        make(**kwargs)
    for name in names:
        assert name in str(excinfo.value)


def test_accepted_edge_values():
    assert make(max_steps=0).max_steps == 0
    assert make(max_steps=100).max_steps == 100
    ratio = make(load_best_model_at_end=True, eval_strategy="steps", eval_steps=0.1, save_steps=0.2)
    assert ratio.save_steps == 0.2
    assert make(load_best_model_at_end=True, eval_strategy="steps", eval_steps=50, save_steps=100).save_steps == 100
    assert make(optim="lion").optim is OptimizerNames.LION_SHORT
    for backend in ("auto", "jax", "torch", "torch_xla"):
        assert make(backend=backend).backend == backend


def test_mesh_and_sharding_rules_parse_json():
    args = make(mesh='{"data": 2, "fsdp": -1, "tensor": "1"}', sharding_rules='[["attn.*kernel", [null, "tensor"]]]')
    assert args.mesh == {"data": 2, "fsdp": -1, "tensor": 1}
    assert args.sharding_rules == [["attn.*kernel", [None, "tensor"]]]
    tupled = make(sharding_rules=[("mlp", ("fsdp", ("data", "tensor")))])
    assert tupled.sharding_rules == [["mlp", ["fsdp", ["data", "tensor"]]]]
    assert make(lr_scheduler_kwargs='{"num_cycles": "2", "power": 1.5}').lr_scheduler_kwargs == {
        "num_cycles": 2,
        "power": 1.5,
    }


# ---------------------------------------------------------------- serialisation


def test_to_json_string_roundtrips():
    args = make(eval_strategy="steps", mesh={"data": 2, "tensor": 2}, sharding_rules=[["w", ["tensor"]]],
                report_to=["tensorboard"], include_for_metrics=["loss"])
    loaded = json.loads(args.to_json_string())
    assert loaded == args.to_dict()
    assert loaded["eval_strategy"] == "steps" and loaded["optim"] == "adamw_torch_fused"
    assert loaded["mesh"] == {"data": 2, "tensor": 2}
    assert "warmup_ratio" not in loaded and "evaluation_strategy" not in loaded
    rebuilt = TrainingArguments(**loaded)
    assert rebuilt.eval_strategy is IntervalStrategy.STEPS and rebuilt.to_dict() == args.to_dict()


def test_sanitized_dict_and_str():
    args = make(mesh={"data": 2})
    sanitized = args.to_sanitized_dict()
    assert sanitized["train_batch_size"] == 8 and sanitized["eval_batch_size"] == 8
    assert sanitized["mesh"] == "{'data': 2}" and sanitized["label_names"] == "None"
    assert all(type(v) in (bool, int, float, str) for v in sanitized.values())
    text = str(args)
    assert text.startswith("TrainingArguments(") and "learning_rate=5e-05" in text
    assert "optim='adamw_torch_fused'" in text
    assert repr(args) == text


def test_token_fields_are_masked():
    @dataclasses.dataclass
    class WithToken(TrainingArguments):
        hub_token: str | None = None

    d = WithToken(output_dir="/tmp/x", hub_token="secret").to_dict()
    assert d["hub_token"] == "<HUB_TOKEN>" and "secret" not in WithToken(hub_token="secret").to_json_string()


# ---------------------------------------------------------------- HfArgumentParser


def test_hf_argument_parser_cli():
    parser = transformers.HfArgumentParser(TrainingArguments)
    with pytest.warns(DeprecationWarning, match="evaluation_strategy"):
        (args,) = parser.parse_args_into_dataclasses(
            [
                "--output_dir", "/tmp/cli-out",
                "--mesh", '{"data": 2, "fsdp": -1}',
                "--backend", "jax",
                "--evaluation_strategy", "steps",
                "--eval_steps", "20",
                "--learning_rate", "3e-4",
                "--optim", "adafactor",
                "--bf16",
                "--activation_checkpointing",
                "--report_to", "tensorboard",
                "--label_names", "labels", "aux",
                "--warmup_steps", "0.05",
                "--sharding_rules", '[["embed", ["fsdp", null]]]',
                "--no_remove_unused_columns",
            ]
        )
    assert args.mesh == {"data": 2, "fsdp": -1} and args.backend == "jax"
    assert args.eval_strategy is IntervalStrategy.STEPS and args.eval_steps == 20
    assert args.learning_rate == 3e-4 and args.optim is OptimizerNames.ADAFACTOR and args.bf16
    assert args.activation_checkpointing and args.gradient_checkpointing
    assert args.report_to == ["tensorboard"] and args.label_names == ["labels", "aux"]
    assert args.warmup_steps == 0.05 and args.get_warmup_steps(100) == 5
    assert args.sharding_rules == [["embed", ["fsdp", None]]] and args.remove_unused_columns is False


def test_hf_argument_parser_bare_deprecated_flags():
    parser = transformers.HfArgumentParser(TrainingArguments)
    with pytest.warns(DeprecationWarning) as record:
        (args,) = parser.parse_args_into_dataclasses(
            ["--gradient_checkpointing", "--group_by_length", "--no_cuda", "--warmup_ratio", "0.2"]
        )
    messages = " ".join(str(w.message) for w in record)
    for old in ("gradient_checkpointing", "group_by_length", "no_cuda", "warmup_ratio"):
        assert old in messages
    assert args.gradient_checkpointing and args.train_sampling_strategy is TrainSamplingStrategy.GROUP_BY_LENGTH
    assert args.use_cpu and args.warmup_steps == 0.2
    with pytest.raises(SystemExit):  # enum choices are enforced by the parser
        parser.parse_args_into_dataclasses(["--optim", "adamw_9bit"])


def test_hf_argument_parser_json_file(tmp_path):
    config = {
        "output_dir": str(tmp_path / "out"),
        "mesh": {"data": -1, "tensor": 2},
        "backend": "torch",
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "load_best_model_at_end": True,
        "metric_for_best_model": "accuracy",
        "lr_scheduler_kwargs": {"num_cycles": 2},
    }
    path = tmp_path / "args.json"
    path.write_text(json.dumps(config))
    (args,) = transformers.HfArgumentParser(TrainingArguments).parse_json_file(str(path))
    assert args.mesh == {"data": -1, "tensor": 2} and args.backend == "torch"
    assert args.load_best_model_at_end and args.greater_is_better is True
    assert args.lr_scheduler_kwargs == {"num_cycles": 2}
    # A saved to_json_string() is itself a valid parse_json_file input.
    path.write_text(args.to_json_string())
    (again,) = transformers.HfArgumentParser(TrainingArguments).parse_json_file(str(path))
    assert again.to_dict() == args.to_dict()


def test_seq2seq_parser_and_to_dict(tmp_path):
    parser = transformers.HfArgumentParser(Seq2SeqTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--predict_with_generate", "--generation_max_length", "64",
         "--generation_num_beams", "4", "--sortish_sampler", "--mesh", '{"data": 4}']
    )
    assert args.predict_with_generate and args.sortish_sampler
    assert (args.generation_max_length, args.generation_num_beams) == (64, 4) and args.mesh == {"data": 4}
    assert args.generation_config is None
    path = tmp_path / "s2s.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), "predict_with_generate": True, "backend": "jax"}))
    (from_file,) = parser.parse_json_file(str(path))
    assert from_file.predict_with_generate and from_file.backend == "jax"

    gen = transformers.GenerationConfig(max_new_tokens=12, num_beams=2)
    with_gen = Seq2SeqTrainingArguments(output_dir=str(tmp_path), generation_config=gen)
    d = with_gen.to_dict()
    assert isinstance(d["generation_config"], dict) and d["generation_config"]["max_new_tokens"] == 12
    assert json.loads(with_gen.to_json_string())["generation_config"]["num_beams"] == 2
    assert d["sortish_sampler"] is False and d["predict_with_generate"] is False


def test_seq2seq_defaults_match_transformers(tmp_path):
    ours = Seq2SeqTrainingArguments(output_dir=str(tmp_path)).to_dict()
    theirs = transformers.Seq2SeqTrainingArguments(output_dir=str(tmp_path)).to_dict()
    for key in ("sortish_sampler", "predict_with_generate", "generation_max_length", "generation_num_beams",
                "generation_config"):
        assert ours[key] == theirs[key]
    with pytest.raises(ValueError, match="generation_num_beams"):
        Seq2SeqTrainingArguments(output_dir=str(tmp_path), generation_num_beams=0)
