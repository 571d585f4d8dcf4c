"""What every TrainingArguments field does on every backend: the decision table behind "no silent no-ops".

For each field and backend one of:

- `Acts`: the field changes behaviour as in transformers; `tests` name tests (run on that backend) that
  fail if the field is ignored.
- `NoEffect`: the field has no meaning on that backend. Setting it to a value other than its default logs
  one warning when the Trainer is built, naming the field, the backend and what to use instead.
- `Refused`: the field cannot run there; a non-default value is an error at construction.
- `Script`: transformers' Trainer does not read it either; scripts do (do_train, ...).

`docs/training_arguments.md` is generated from this table (`python scripts/generate_docs.py`), and
tests/args/test_args_support.py checks that every field of transformers' TrainingArguments has a decision on
every backend, that every named test exists, and that the committed table is current.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "jax", "torch_xla")


@dataclass(frozen=True)
class Acts:
    tests: tuple[str, ...]
    note: str = ""


@dataclass(frozen=True)
class NoEffect:
    instead: str


@dataclass(frozen=True)
class Refused:
    reason: str


@dataclass(frozen=True)
class Script:
    note: str = "read by scripts; transformers' Trainer does not read it either"


FRONT = "tests/args/test_front_fields.py::"
HUB = "tests/args_real/test_hub_fields.py::"
BACK = "tests/args/test_backend_fields.py::"


def _acts(*tests: str, note: str = "") -> Acts:
    return Acts(tuple(tests), note)


def everywhere(decision) -> dict[str, Any]:
    return {backend: decision for backend in BACKENDS}


def front(*tests: str, note: str = "") -> dict[str, Any]:
    """Acts on every backend through the shared loop; the tests are parametrised over the backends."""
    return everywhere(_acts(*(FRONT + t for t in tests), note=note))


def per_backend(torch, jax, torch_xla) -> dict[str, Any]:
    return {"torch": torch, "jax": jax, "torch_xla": torch_xla}


_NOT_ON_JAX_DDP = NoEffect("jax runs SPMD over the mesh without DDP; use mesh={'data': N}")
_NOT_ON_XLA_DDP = NoEffect("torch_xla runs one SPMD process over the mesh; use mesh={'data': N}")
_TORCH_ONLY_COMPILE_JAX = NoEffect("the jax step is always compiled by XLA; nothing to turn on")
_TORCH_ONLY_COMPILE_XLA = NoEffect("torch_xla compiles every step with XLA already")
_NO_ACCELERATE = "xtrainer's loop and data pipeline do not run through accelerate"

SUPPORT: dict[str, dict[str, Any]] = {
    # ---- script flags and run identity
    "output_dir": front("test_saving_and_rotation"),
    "do_train": everywhere(Script()),
    "do_eval": everywhere(Script("read by scripts; set by eval_strategy, as in transformers")),
    "do_predict": everywhere(Script()),
    "resume_from_checkpoint": front("test_resume"),
    "run_name": front("test_run_name_reaches_the_integrations"),
    "project": everywhere(NoEffect("it names a Trackio project, and Trackio is not an xtrainer integration; use "
                                   "report_to='tensorboard', 'jsonl' or 'wandb'")),
    "trackio_space_id": everywhere(NoEffect("Trackio is not an xtrainer integration; use report_to='wandb' or 'tensorboard'")),
    "trackio_bucket_id": everywhere(NoEffect("Trackio is not an xtrainer integration; use report_to='wandb' or 'tensorboard'")),
    "trackio_static_space_id": everywhere(NoEffect("Trackio is not an xtrainer integration; use report_to='wandb' or "
                                                   "'tensorboard'")),
    # ---- duration and batching
    "per_device_train_batch_size": front("test_run_length_and_batching"),
    "per_device_eval_batch_size": front("test_evaluation"),
    "num_train_epochs": front("test_run_length_and_batching"),
    "max_steps": front("test_run_length_and_batching"),
    "gradient_accumulation_steps": front("test_run_length_and_batching"),
    "eval_accumulation_steps": front("test_evaluation"),
    "average_tokens_across_devices": front("test_token_count_normalisation"),
    # ---- optimizer and schedule
    "learning_rate": front("test_learning_rate_schedule"),
    "lr_scheduler_type": front("test_learning_rate_schedule"),
    "lr_scheduler_kwargs": front("test_learning_rate_schedule"),
    "warmup_steps": front("test_learning_rate_schedule"),
    "optim": front("test_optimizer_fields"),
    "optim_args": front("test_optimizer_fields"),
    "optim_target_modules": everywhere(NoEffect("only GaLore / APOLLO optimizers read it, and no such optimizer runs "
                                                "in this version; leave it unset")),
    "weight_decay": front("test_optimizer_fields"),
    "adam_beta1": front("test_optimizer_fields"),
    "adam_beta2": front("test_optimizer_fields"),
    "adam_epsilon": front("test_optimizer_fields"),
    "max_grad_norm": front("test_optimizer_fields"),
    "label_smoothing_factor": per_backend(
        torch=_acts("tests/parity/test_hf_trainer_parity.py::test_label_smoothing_matches_hf", BACK + "test_label_smoothing"),
        jax=NoEffect("label smoothing is computed by the torch backends only in this version; smooth the targets in "
                     "compute_loss or use backend='torch'"),
        torch_xla=_acts(BACK + "test_label_smoothing"),
    ),
    # ---- precision
    "bf16": per_backend(torch=_acts("tests/backends/torch/test_torch_backend.py::test_mixed_precision_trains_with_fp32_master_weights"),
                        jax=_acts("tests/backends/jax/test_jax_training.py::test_mixed_precision_keeps_fp32_master_weights"),
                        torch_xla=_acts("tests/backends/torch_xla/test_torch_xla_backend.py::test_bf16_trains")),
    "fp16": per_backend(torch=_acts("tests/backends/torch/test_torch_backend.py::test_fp16_checkpoint_has_scaler_state"),
                        jax=_acts("tests/fault/test_nan_policy.py::test_fp16_skip_keeps_the_loss_scale"),
                        torch_xla=Refused("fp16 needs a loss scaler XLA does not run; use bf16=True")),
    "bf16_full_eval": everywhere(NoEffect("evaluation runs in the training precision (bf16=True casts the compute) in "
                                          "this version; cast the model yourself before evaluate()")),
    "fp16_full_eval": everywhere(NoEffect("evaluation runs in the training precision in this version; cast the model "
                                          "yourself before evaluate()")),
    "tf32": per_backend(torch=_acts(BACK + "test_tf32", note="TF32 matmuls on CUDA; an error without an Ampere GPU, as in "
                                    "transformers"),
                        jax=NoEffect("XLA chooses matmul precision; use jax.default_matmul_precision"),
                        torch_xla=NoEffect("XLA chooses matmul precision on TPU")),
    # ---- activation checkpointing and compilation
    "activation_checkpointing": per_backend(
        torch=_acts("tests/backends/torch/test_torch_backend.py::test_gradient_checkpointing_gives_the_same_losses"),
        jax=_acts("tests/backends/jax/test_jax_training.py::test_remat_gives_the_same_losses"),
        torch_xla=_acts(BACK + "test_activation_checkpointing_on_torch_xla")),
    "activation_checkpointing_kwargs": per_backend(
        torch=_acts(BACK + "test_activation_checkpointing_kwargs_reach_the_model"),
        jax=NoEffect("jax rematerialises the whole forward (jax.checkpoint); the kwargs are torch's"),
        torch_xla=_acts(BACK + "test_activation_checkpointing_kwargs_reach_the_model")),
    "gradient_checkpointing": everywhere(Script("deprecated alias of activation_checkpointing (mapped, with a warning)")),
    "gradient_checkpointing_kwargs": everywhere(Script("deprecated alias of activation_checkpointing_kwargs (mapped)")),
    "torch_compile": per_backend(torch=_acts("tests/backends/torch/test_torch_backend.py::test_torch_compile_matches_eager"),
                                 jax=_TORCH_ONLY_COMPILE_JAX, torch_xla=_TORCH_ONLY_COMPILE_XLA),
    "torch_compile_backend": per_backend(torch=_acts(BACK + "test_torch_compile_options_reach_torch_compile"),
                                         jax=_TORCH_ONLY_COMPILE_JAX, torch_xla=_TORCH_ONLY_COMPILE_XLA),
    "torch_compile_mode": per_backend(torch=_acts(BACK + "test_torch_compile_options_reach_torch_compile"),
                                      jax=_TORCH_ONLY_COMPILE_JAX, torch_xla=_TORCH_ONLY_COMPILE_XLA),
    # ---- logging
    "logging_strategy": front("test_logging"),
    "logging_steps": front("test_logging"),
    "logging_first_step": front("test_logging"),
    "log_on_each_node": front("test_process_roles"),
    "logging_nan_inf_filter": front("test_logging_nan_inf_filter"),
    "nan_policy": per_backend(torch=_acts("tests/fault/test_nan_policy.py::test_torch_skip_equals_run_without_the_bad_batch"),
                              jax=_acts("tests/fault/test_nan_policy.py::test_jax_skip_equals_run_without_the_bad_batch_with_no_host_sync"),
                              torch_xla=_acts("tests/fault/test_nan_policy.py::test_torch_xla_skip_and_raise")),
    "include_num_input_tokens_seen": front("test_logging"),
    "log_level": front("test_log_levels"),
    "log_level_replica": front("test_log_levels"),
    "disable_tqdm": front("test_progress_bar"),
    "report_to": front("test_run_name_reaches_the_integrations"),
    # ---- evaluation
    "eval_strategy": front("test_evaluation"),
    "eval_steps": front("test_evaluation"),
    "eval_delay": front("test_evaluation"),
    "prediction_loss_only": front("test_evaluation_outputs"),
    "eval_on_start": front("test_evaluation"),
    "eval_do_concat_batches": front("test_evaluation_outputs"),
    "include_for_metrics": front("test_evaluation_outputs"),
    "batch_eval_metrics": front("test_evaluation_outputs"),
    "eval_use_gather_object": everywhere(NoEffect("evaluation runs the whole eval set on every process, so nothing is "
                                                  "gathered; leave it unset")),
    # ---- saving and resuming
    "save_strategy": front("test_saving_and_rotation"),
    "save_steps": front("test_saving_and_rotation"),
    "save_total_limit": front("test_saving_and_rotation"),
    "save_only_model": front("test_saving_and_rotation"),
    "save_on_each_node": front("test_process_roles"),
    "load_best_model_at_end": front("test_best_model"),
    "metric_for_best_model": front("test_best_model"),
    "greater_is_better": front("test_best_model"),
    "ignore_data_skip": front("test_resume"),
    "restore_callback_states_from_checkpoint": front("test_resume"),
    "allow_unsafe_checkpoint_load": per_backend(
        torch=_acts("tests/fault/test_safe_loading.py::test_opt_in_unpickles_fully"),
        jax=NoEffect("orbax checkpoints hold arrays, not pickles: there is nothing unsafe to allow"),
        torch_xla=_acts("tests/fault/test_safe_loading.py::test_opt_in_unpickles_fully")),
    "enable_jit_checkpoint": front("test_sigterm_checkpoint_needs_enable_jit_checkpoint"),
    # ---- reproducibility and hardware
    "seed": front("test_data_order"),
    "data_seed": front("test_data_order"),
    "full_determinism": per_backend(
        torch=_acts(BACK + "test_full_determinism_on_torch"),
        jax=NoEffect("XLA:CPU and TPU steps are deterministic already; on GPU set "
                     "XLA_FLAGS=--xla_gpu_deterministic_ops=true before JAX starts"),
        torch_xla=NoEffect("XLA steps are deterministic on TPU and CPU already")),
    "use_cpu": per_backend(torch=_acts("tests/backends/torch/test_torch_backend.py::test_device_is_chosen_automatically"),
                           jax=NoEffect("JAX picks its platform when it starts; set JAX_PLATFORMS=cpu"),
                           torch_xla=NoEffect("torch_xla runs on its PJRT device; set PJRT_DEVICE=CPU")),
    "use_cache": per_backend(torch=_acts(BACK + "test_use_cache_sets_the_model_config"),
                             jax=_acts(BACK + "test_use_cache_sets_the_model_config"),
                             torch_xla=_acts(BACK + "test_use_cache_sets_the_model_config")),
    "debug": per_backend(torch=_acts(BACK + "test_debug_underflow_overflow"),
                         jax=NoEffect("underflow_overflow hooks torch modules and tpu_metrics_debug reads torch_xla "
                                      "metrics; on jax use nan_policy='raise'"),
                         torch_xla=_acts(BACK + "test_debug_tpu_metrics_on_torch_xla")),
    # ---- data loading
    "dataloader_drop_last": front("test_run_length_and_batching"),
    "dataloader_num_workers": everywhere(NoEffect("batches are collated in the training process in this version")),
    "dataloader_pin_memory": everywhere(NoEffect("batches are placed on the device from unpinned host memory in this version")),
    "dataloader_persistent_workers": everywhere(NoEffect("batches are collated in the training process in this version")),
    "dataloader_prefetch_factor": everywhere(NoEffect("batches are collated in the training process in this version; the "
                                                      "next window is placed on the device while a step runs")),
    "dataloader_multiprocessing_context": everywhere(NoEffect("batches are collated in the training process in this version")),
    "dataloader_in_order": everywhere(NoEffect("batches always arrive in order in this version")),
    "remove_unused_columns": front("test_data_order"),
    "label_names": front("test_evaluation_outputs"),
    "train_sampling_strategy": front("test_data_order"),
    "length_column_name": front("test_data_order"),
    "auto_find_batch_size": per_backend(
        torch=_acts("tests/integration/test_auto_find_batch_size.py::test_torch_restarts_from_the_start_with_a_smaller_batch",
                    note="out of memory restarts training with int(0.9 x batch), as accelerate does"),
        jax=_acts("tests/integration/test_auto_find_batch_size.py::test_jax_plans_the_largest_batch_that_fits",
                  note="the compiled step is checked against device memory; the largest batch that fits is found "
                       "by compiling smaller ones"),
        torch_xla=_acts("tests/integration/test_auto_find_batch_size.py::test_torch_xla_restarts_after_resource_exhausted",
                        note="RESOURCE_EXHAUSTED restarts training with int(0.9 x batch)"),
    ),
    "neftune_noise_alpha": everywhere(NoEffect("NEFTune embedding noise is not applied in this version")),
    "torch_empty_cache_steps": everywhere(NoEffect("the accelerator cache is not emptied in this version")),
    "skip_memory_metrics": everywhere(_acts("tests/args_real/test_skip_memory_metrics.py::test_memory_metrics_per_stage")),
    "use_liger_kernel": per_backend(
        torch=Refused("xtrainer does not patch models with Liger's Triton kernels in this version; train without it, "
                      "or apply liger_kernel.transformers to the model yourself before building the Trainer"),
        jax=Refused("Liger kernels are Triton kernels for torch on GPUs; jax compiles its own kernels"),
        torch_xla=Refused("Liger kernels are Triton kernels for CUDA; they do not run on XLA devices")),
    "liger_kernel_config": everywhere(NoEffect("it configures use_liger_kernel, which is off")),
    # ---- distributed
    "local_rank": per_backend(torch=_acts(BACK + "test_local_rank_names_the_process"),
                              jax=NoEffect("jax processes are placed by JAX_PROCESS_ID / jax.distributed"),
                              torch_xla=NoEffect("torch_xla runs one process per host")),
    "ddp_backend": per_backend(torch=_acts(BACK + "test_ddp_fields_reach_ddp"), jax=_NOT_ON_JAX_DDP, torch_xla=_NOT_ON_XLA_DDP),
    "ddp_timeout": per_backend(torch=_acts(BACK + "test_ddp_fields_reach_ddp"), jax=_NOT_ON_JAX_DDP, torch_xla=_NOT_ON_XLA_DDP),
    "ddp_find_unused_parameters": per_backend(torch=_acts(BACK + "test_ddp_fields_reach_ddp"), jax=_NOT_ON_JAX_DDP,
                                              torch_xla=_NOT_ON_XLA_DDP),
    "ddp_bucket_cap_mb": per_backend(torch=_acts(BACK + "test_ddp_fields_reach_ddp"), jax=_NOT_ON_JAX_DDP,
                                     torch_xla=_NOT_ON_XLA_DDP),
    "ddp_broadcast_buffers": per_backend(torch=_acts(BACK + "test_ddp_fields_reach_ddp"), jax=_NOT_ON_JAX_DDP,
                                         torch_xla=_NOT_ON_XLA_DDP),
    "ddp_static_graph": per_backend(torch=_acts(BACK + "test_ddp_fields_reach_ddp"), jax=_NOT_ON_JAX_DDP,
                                    torch_xla=_NOT_ON_XLA_DDP),
    "fsdp": per_backend(torch=_acts("tests/backends/torch/test_distributed.py::test_fsdp_matches_one_process_with_doubled_batch"),
                        jax=NoEffect("use mesh={'fsdp': N} to shard parameters over N devices"),
                        torch_xla=NoEffect("use mesh={'fsdp': N} to shard parameters over N devices")),
    "fsdp_config": per_backend(torch=_acts(BACK + "test_fsdp_config_layer_classes"),
                               jax=NoEffect("use mesh={'fsdp': N} and sharding_rules"),
                               torch_xla=NoEffect("use mesh={'fsdp': N} and sharding_rules")),
    "accelerator_config": everywhere(NoEffect(f"{_NO_ACCELERATE}; leave it unset")),
    "parallelism_config": everywhere(NoEffect(f"{_NO_ACCELERATE}; describe parallelism with mesh= (jax, torch_xla) or "
                                              "fsdp= under torchrun (torch)")),
    "deepspeed": everywhere(Refused("xtrainer does not run DeepSpeed; use fsdp='full_shard' under torchrun (torch) or an "
                                    "fsdp mesh axis (jax, torch_xla)")),
    # ---- hub
    "push_to_hub": per_backend(torch=_acts(HUB + "test_every_save_pushes_the_model_and_push_to_hub_adds_the_card"),
                               jax=_acts(HUB + "test_jax_checkpoints_push_the_exported_model"),
                               torch_xla=_acts(HUB + "test_every_save_pushes_the_model_and_push_to_hub_adds_the_card",
                                               note="the torch backends share the upload path")),
    "hub_token": everywhere(_acts(HUB + "test_every_save_pushes_the_model_and_push_to_hub_adds_the_card")),
    "hub_private_repo": everywhere(_acts(HUB + "test_private_repo_revision_and_default_name")),
    "hub_model_id": everywhere(_acts(HUB + "test_private_repo_revision_and_default_name")),
    "hub_strategy": everywhere(_acts(HUB + "test_checkpoint_strategies")),
    "hub_always_push": everywhere(_acts(HUB + "test_a_push_in_flight_skips_the_next_unless_hub_always_push")),
    "hub_revision": everywhere(_acts(HUB + "test_private_repo_revision_and_default_name")),
    # ---- xtrainer's own fields
    "backend": everywhere(_acts("tests/unit/test_backend_selection.py::test_auto_selection")),
    "mesh": per_backend(torch=NoEffect("the torch backend runs one device per process; use torchrun for data parallelism "
                                       "and fsdp='full_shard' for sharding"),
                        jax=_acts("tests/backends/jax/test_mesh.py::test_loss_curve_is_the_same_on_every_mesh"),
                        torch_xla=_acts("tests/backends/torch_xla/test_torch_xla_backend.py::test_mesh_training_matches_torch_backend")),
    "tpu_config": per_backend(torch=NoEffect("TPU presets describe a JAX / torch_xla mesh; use backend='jax'"),
                              jax=_acts("tests/unit/test_tpu_presets.py::test_jax_backend_uses_the_preset_mesh_and_checks_devices"),
                              torch_xla=NoEffect("torch_xla takes its mesh from mesh=; copy the preset's axes there")),
    "sharding_rules": per_backend(torch=NoEffect("the torch backend shards with FSDP2 per layer; use fsdp='full_shard'"),
                                  jax=_acts("tests/backends/jax/test_mesh.py::test_default_fsdp_rule_and_user_rules"),
                                  torch_xla=_acts(BACK + "test_sharding_rules_on_torch_xla")),
    "jax_compilation_cache_dir": per_backend(
        torch=NoEffect("it is JAX's persistent compilation cache; torch_compile caches in TORCHINDUCTOR_CACHE_DIR"),
        jax=_acts("tests/backends/jax/test_compilation.py::test_persistent_compilation_cache_is_written_and_reused"),
        torch_xla=NoEffect("it is JAX's cache; torch_xla's is set with torch_xla.runtime.initialize_cache")),
    "async_checkpointing": per_backend(
        torch=_acts("tests/fault/test_checkpoint_agreement.py::test_async_torch_checkpoints_equal_synchronous_ones"),
        jax=_acts("tests/fault/test_checkpoint_agreement.py::test_async_jax_checkpoints_restore_bitwise_like_synchronous_ones"),
        torch_xla=NoEffect("torch_xla checkpoints are written in the step loop; the next step waits for them")),
    "jax_heartbeat_timeout": per_backend(
        torch=NoEffect("torch processes watch each other through ddp_timeout"),
        jax=_acts("tests/fault/test_faults_at_scale.py::test_a_killed_rank_stops_the_others_with_a_clear_error"),
        torch_xla=NoEffect("torch_xla runs one process per host; a dead host ends the run")),
    "xla_pad_batches": per_backend(torch=NoEffect("torch runs dynamic shapes eagerly"),
                                   jax=NoEffect("the jax backend pads short windows itself"),
                                   torch_xla=_acts("tests/backends/torch_xla/test_static_shapes.py::test_short_batch_gets_ignored_rows_and_bucketed_length")),
    "xla_seq_bucket": per_backend(torch=NoEffect("torch runs dynamic shapes eagerly"),
                                  jax=NoEffect("pad sequences to a fixed length in the collator"),
                                  torch_xla=_acts("tests/backends/torch_xla/test_static_shapes.py::test_seq_bucket")),
    "xla_max_graphs": per_backend(torch=NoEffect("torch runs eagerly: there are no graphs to count"),
                                  jax=NoEffect("the jax backend warns at every recompilation"),
                                  torch_xla=_acts("tests/backends/torch_xla/test_torch_xla_backend.py::test_recompilation_guard_names_the_cause")),
    "xla_on_recompile": per_backend(torch=NoEffect("torch runs eagerly: there are no graphs to count"),
                                    jax=NoEffect("the jax backend warns at every recompilation"),
                                    torch_xla=_acts("tests/backends/torch_xla/test_torch_xla_backend.py::test_recompilation_guard_names_the_cause")),
    # ---- transformers 4 names (mapped onto their transformers 5 fields, with a DeprecationWarning)
    "warmup_ratio": everywhere(Script("deprecated alias of warmup_steps < 1 (mapped)")),
    "evaluation_strategy": everywhere(Script("deprecated alias of eval_strategy (mapped)")),
    "group_by_length": everywhere(Script("deprecated alias of train_sampling_strategy='group_by_length' (mapped)")),
    "tpu_num_cores": everywhere(Script("deprecated alias of mesh={'data': N} (mapped)")),
    "overwrite_output_dir": everywhere(Script("deprecated and without effect in transformers 5 too (a warning says so)")),
    "no_cuda": everywhere(Script("deprecated alias of use_cpu (mapped)")),
    "logging_dir": front("test_run_name_reaches_the_integrations", note="TensorBoard's log directory"),
    # ---- Seq2SeqTrainingArguments
    "sortish_sampler": front("test_data_order", note="selects train_sampling_strategy='group_by_length'"),
    "predict_with_generate": front("test_generation_fields"),
    "generation_max_length": front("test_generation_fields"),
    "generation_num_beams": front("test_generation_fields"),
    "generation_config": front("test_generation_fields"),
}


@lru_cache(maxsize=8)
def _defaults(cls) -> Any:
    """A default instance of the arguments class (its post-init normalises values: debug "" -> [], ...)."""
    from .training_args import TrainingArguments

    try:
        return cls(output_dir="unused", backend="torch", report_to="none")
    except Exception:  # a user subclass with required fields of its own: transformers' class has the defaults
        return TrainingArguments(output_dir="unused", backend="torch", report_to="none")


def _is_default(args, name: str) -> bool:
    defaults = _defaults(type(args))
    if not hasattr(defaults, name):
        return True
    default, value = getattr(defaults, name), getattr(args, name)
    try:
        return bool(value == default) or (value is None and default in ("", [], {}))
    except Exception:  # values without a boolean equality (arrays): treat as set
        return False


def inert_settings(args, backend: str) -> list[str]:
    """Warning texts for the fields set away from their defaults that do nothing on `backend`."""
    messages = []
    for name, decisions in SUPPORT.items():
        decision = decisions.get(backend)
        if isinstance(decision, NoEffect) and hasattr(args, name) and not _is_default(args, name):
            messages.append(f"`{name}`={getattr(args, name)!r} has no effect on backend={backend!r}: {decision.instead}.")
    return messages


def refused_settings(args, backend: str) -> list[str]:
    """Errors for fields set away from their defaults that cannot run on `backend`."""
    problems = []
    for name, decisions in SUPPORT.items():
        decision = decisions.get(backend)
        if isinstance(decision, Refused) and hasattr(args, name) and not _is_default(args, name):
            problems.append(f"`{name}`={getattr(args, name)!r} cannot run on backend={backend!r}: {decision.reason}.")
    return problems


def refused_everywhere(args) -> list[str]:
    """Errors for fields that no backend can run, known as soon as the arguments are built."""
    problems = []
    for name, decisions in SUPPORT.items():
        if all(isinstance(decisions[b], Refused) for b in BACKENDS) and hasattr(args, name) and not _is_default(args, name):
            problems.append(f"`{name}`={getattr(args, name)!r} cannot run: {decisions['torch'].reason}.")
    return problems


def report_unsupported(args, backend: str) -> None:
    """At Trainer construction: raise for refused fields, warn once for each field without effect."""
    problems = refused_settings(args, backend)
    if problems:
        raise ValueError("\n".join(problems))
    for message in inert_settings(args, backend):
        logger.warning(message)


# ---------------------------------------------------------------- the docs table


def _cell(decision) -> str:
    if isinstance(decision, Acts):
        return "acts" + (f" ({decision.note})" if decision.note else "")
    if isinstance(decision, NoEffect):
        return f"no effect, warns: {decision.instead}"
    if isinstance(decision, Refused):
        return f"refused: {decision.reason}"
    return f"script: {decision.note}"


def markdown_table() -> str:
    """docs/training_arguments.md: the decision of every field on every backend."""
    lines = [
        "# TrainingArguments on each backend",
        "",
        "Generated by `python scripts/generate_docs.py` from `xtrainer/args_support.py`; "
        "`tests/args/test_args_support.py` fails when it is out of date.",
        "",
        "- **acts**: the field changes behaviour as in transformers; the tests listed in args_support.py fail if it is "
        "ignored on that backend.",
        "- **no effect, warns**: setting it away from its default logs one warning when the Trainer is built, with "
        "what to use instead.",
        "- **refused**: setting it is an error when the Trainer is built.",
        "- **script**: transformers' Trainer does not read it either (scripts do), or a deprecated name mapped onto "
        "its transformers 5 field.",
        "",
        "| field | torch | jax | torch_xla |",
        "| --- | --- | --- | --- |",
    ]
    for name in sorted(SUPPORT):
        cells = [_cell(SUPPORT[name][b]).replace("|", "\\|") for b in BACKENDS]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    counts = {b: {"acts": 0, "no effect": 0, "refused": 0, "script": 0} for b in BACKENDS}
    for decisions in SUPPORT.values():
        for backend in BACKENDS:
            kind = _cell(decisions[backend]).split(",")[0].split(":")[0].split(" (")[0]
            counts[backend][kind] += 1
    lines += ["", "| backend | acts | no effect | refused | script |", "| --- | --- | --- | --- | --- |"]
    for backend in BACKENDS:
        c = counts[backend]
        lines.append(f"| {backend} | {c['acts']} | {c['no effect']} | {c['refused']} | {c['script']} |")
    return "\n".join(lines) + "\n"


def all_field_names() -> list[str]:
    from .training_args import Seq2SeqTrainingArguments

    return [f.name for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init]
