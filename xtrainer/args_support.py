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
BACK = "tests/args/test_backend_fields.py::"
MEM = "tests/args_real/test_skip_memory_metrics.py::"
HUB = "tests/args_real/test_hub_fields.py::"
REAL = "tests/args_real/"
LOADERS = "tests/unit/test_loaders.py::"
PIPELINE = "tests/integration/test_input_pipeline.py::"


def _acts(*tests: str, note: str = "") -> Acts:
    return Acts(tuple(tests), note)


def everywhere(decision) -> dict[str, Any]:
    return {backend: decision for backend in BACKENDS}


def front(*tests: str, note: str = "") -> dict[str, Any]:
    """Acts on every backend through the shared loop; the tests are parametrised over the backends."""
    return everywhere(_acts(*(FRONT + t for t in tests), note=note))


def _optimizer_proof() -> dict[str, Any]:
    """The optimizer hyperparameters: they change the weights (front test) and exactly as AdamW does (numpy reference)."""
    return everywhere(_acts(FRONT + "test_optimizer_fields",
                            "tests/args/test_adamw_reference.py::test_adamw_hyperparameters_reach_the_update"))


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
    "optim_target_modules": per_backend(
        torch=_acts("tests/backends/torch/test_torch_optimizers.py::test_optimizer_trains_as_transformers_runs_it",
                    note="read by the GaLore / APOLLO optim values, as in transformers"),
        jax=NoEffect("only GaLore / APOLLO optimizers read it, and they cannot run on jax (they hook torch nn.Linear "
                     "modules); use backend='torch'"),
        torch_xla=_acts("tests/backends/torch_xla/test_torch_xla_optimizers.py::test_optimizer_matches_the_torch_backend",
                        note="read by the GaLore optim values (APOLLO cannot run on torch_xla)"),
    ),
    "weight_decay": _optimizer_proof(),
    "adam_beta1": _optimizer_proof(),
    "adam_beta2": _optimizer_proof(),
    "adam_epsilon": _optimizer_proof(),
    "max_grad_norm": _optimizer_proof(),
    "label_smoothing_factor": per_backend(
        torch=_acts("tests/parity/test_hf_trainer_parity.py::test_label_smoothing_matches_hf", BACK + "test_label_smoothing"),
        jax=_acts(REAL + "test_label_smoothing_factor.py::test_jax_reference_llama_matches_torch_backend",
                  REAL + "test_label_smoothing_factor.py::test_torchax_gpt2_matches_torch_backend",
                  note="the default compute_loss smooths in the compiled step, as transformers' LabelSmoother"),
        torch_xla=_acts(BACK + "test_label_smoothing"),
    ),
    # ---- precision
    "bf16": per_backend(torch=_acts("tests/backends/torch/test_torch_backend.py::test_mixed_precision_trains_with_fp32_master_weights"),
                        jax=_acts("tests/backends/jax/test_jax_training.py::test_mixed_precision_keeps_fp32_master_weights"),
                        torch_xla=_acts("tests/backends/torch_xla/test_torch_xla_backend.py::test_bf16_trains")),
    "fp16": per_backend(torch=_acts("tests/backends/torch/test_torch_backend.py::test_fp16_checkpoint_has_scaler_state"),
                        jax=_acts("tests/fault/test_nan_policy.py::test_fp16_skip_keeps_the_loss_scale"),
                        torch_xla=Refused("fp16 needs a loss scaler XLA does not run; use bf16=True")),
    "bf16_full_eval": per_backend(
        torch=_acts(REAL + "test_bf16_full_eval.py::test_torch_matches_transformers",
                    REAL + "test_bf16_full_eval.py::test_torch_evaluation_during_training_keeps_float32"),
        jax=_acts(REAL + "test_bf16_full_eval.py::test_jax_reference_model_evaluates_with_half_precision_weights",
                  REAL + "test_bf16_full_eval.py::test_jax_evaluation_during_training_keeps_training_precision",
                  REAL + "test_bf16_full_eval.py::test_torchax_evaluates_in_half_precision",
                  note="the eval step casts the weights and float inputs; the trained fp32 weights stay as they are"),
        torch_xla=_acts(REAL + "test_bf16_full_eval.py::test_torch_xla_evaluates_in_half_precision")),
    "fp16_full_eval": per_backend(
        torch=_acts(REAL + "test_fp16_full_eval.py::test_torch_matches_transformers",
                    REAL + "test_fp16_full_eval.py::test_torch_evaluation_during_training_keeps_float32"),
        jax=_acts(REAL + "test_fp16_full_eval.py::test_jax_reference_model_evaluates_with_half_precision_weights",
                  REAL + "test_fp16_full_eval.py::test_jax_evaluation_during_training_keeps_training_precision",
                  REAL + "test_fp16_full_eval.py::test_torchax_evaluates_in_half_precision",
                  note="the eval step casts the weights and float inputs; the trained fp32 weights stay as they are"),
        torch_xla=_acts(REAL + "test_fp16_full_eval.py::test_torch_xla_evaluates_in_half_precision")),
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
    "log_on_each_node": per_backend(
        torch=_acts(FRONT + "test_process_roles", "tests/args/test_two_nodes.py::test_two_torch_nodes"),
        jax=_acts(FRONT + "test_process_roles", "tests/backends/jax/test_multihost.py::test_two_processes_match_one_process"),
        torch_xla=_acts(FRONT + "test_process_roles")),
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
    "save_on_each_node": per_backend(
        torch=_acts(FRONT + "test_process_roles", "tests/args/test_two_nodes.py::test_two_torch_nodes",
                    note="each node's first process writes a whole checkpoint into its own output_dir"),
        jax=_acts(FRONT + "test_process_roles"), torch_xla=_acts(FRONT + "test_process_roles")),
    "load_best_model_at_end": front("test_best_model"),
    "metric_for_best_model": front("test_best_model"),
    "greater_is_better": front("test_best_model"),
    "ignore_data_skip": front("test_resume"),
    "restore_callback_states_from_checkpoint": front("test_resume"),
    "allow_unsafe_checkpoint_load": per_backend(
        torch=_acts("tests/fault/test_safe_loading.py::test_opt_in_unpickles_fully"),
        jax=NoEffect("orbax checkpoints hold arrays, not pickles: there is nothing unsafe to allow"),
        torch_xla=_acts("tests/fault/test_safe_loading.py::test_opt_in_unpickles_fully")),
    "enable_jit_checkpoint": per_backend(
        torch=_acts(FRONT + "test_sigterm_checkpoint_needs_enable_jit_checkpoint"),
        jax=_acts(FRONT + "test_sigterm_checkpoint_needs_enable_jit_checkpoint",
                  "tests/args/test_jax_sigterm_default.py::test_sigterm_outside_train_on_a_multi_host_jax_run"),
        torch_xla=_acts(FRONT + "test_sigterm_checkpoint_needs_enable_jit_checkpoint")),
    # ---- reproducibility and hardware
    "seed": front("test_data_order"),
    "data_seed": front("test_data_order"),
    "full_determinism": per_backend(
        torch=_acts(BACK + "test_full_determinism_on_torch"),
        jax=_acts(REAL + "test_full_determinism.py::test_flags_reach_the_compiler_and_two_runs_are_bitwise_equal",
                  REAL + "test_full_determinism.py::test_trainer_steps_compile_with_the_options_after_jax_started",
                  note="xla_gpu_deterministic_ops for the process (when JAX has not started) and for every step it "
                       "compiles; XLA:CPU and TPU steps are deterministic already"),
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
    # The loader is the front's (loaders.py, data_workers.py): its worker processes serve every backend.
    "dataloader_num_workers": everywhere(_acts(
        LOADERS + "test_batches_are_identical_for_0_1_2_4_workers_with_a_random_collator",
        PIPELINE + "test_the_loss_curve_is_the_same_for_0_and_2_workers_on_torch_and_jax",
        note="worker processes make the batches; the same batches as with none")),
    "dataloader_pin_memory": per_backend(
        torch=_acts(LOADERS + "test_dataloader_fields_reach_the_worker_processes",
                    note="on CUDA, with dataloader_num_workers > 0"),
        jax=NoEffect("JAX stages its host-to-device copies itself; nothing to set"),
        torch_xla=NoEffect("torch_xla stages its host-to-device copies itself; nothing to set")),
    "dataloader_persistent_workers": everywhere(_acts(PIPELINE + "test_persistent_workers_serve_every_evaluation",
                                                      LOADERS + "test_dataloader_fields_reach_the_worker_processes")),
    "dataloader_prefetch_factor": everywhere(_acts(LOADERS + "test_dataloader_fields_reach_the_worker_processes")),
    "dataloader_multiprocessing_context": everywhere(_acts(LOADERS + "test_spawned_workers_give_the_same_batches",
                                                           LOADERS + "test_dataloader_fields_reach_the_worker_processes")),
    "dataloader_in_order": everywhere(_acts(LOADERS + "test_out_of_order_batches_resume_without_repeating_or_losing_any",
                                            LOADERS + "test_dataloader_fields_reach_the_worker_processes")),
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
    "neftune_noise_alpha": per_backend(
        torch=_acts(REAL + "test_neftune_noise_alpha.py::test_torch_hook_equals_transformers_hook",
                    REAL + "test_neftune_noise_alpha.py::test_torch_backend_noises_training_embeddings_only"),
        jax=_acts(REAL + "test_neftune_noise_alpha.py::test_jax_flax_llama_noise_follows_the_step_rng",
                  REAL + "test_neftune_noise_alpha.py::test_jax_noise_has_the_exact_bound",
                  REAL + "test_neftune_noise_alpha.py::test_torchax_gpt2_noise_follows_the_step_rng",
                  note="torch modules (torchax) and xtrainer's Flax Llama/BERT/T5; other Flax models are refused"),
        torch_xla=_acts(REAL + "test_neftune_noise_alpha.py::test_torch_xla_noises_training_only")),
    "torch_empty_cache_steps": per_backend(
        torch=_acts(REAL + "test_torch_empty_cache_steps.py::test_cache_is_emptied_every_n_steps_for_each_micro_batch",
                    REAL + "test_torch_empty_cache_steps.py::test_resume_continues_the_step_count",
                    note="CUDA/ROCm, XPU, MPS and NPU caches; on CPU it says once that there is none"),
        jax=NoEffect("XLA's runtime owns device memory and keeps no allocator cache to hand back; lower "
                     "XLA_PYTHON_CLIENT_MEM_FRACTION or set XLA_PYTHON_CLIENT_PREALLOCATE=false to leave memory free"),
        torch_xla=NoEffect("the XLA runtime owns device memory and keeps no allocator cache to hand back")),
    "skip_memory_metrics": per_backend(
        torch=_acts(MEM + "test_memory_metrics_per_stage", note="process RSS; the CUDA allocator's figures on GPUs"),
        jax=_acts(MEM + "test_memory_metrics_per_stage", note="process RSS; the devices' memory_stats() where the "
                  "runtime reports them (JAX's CPU devices report none: RSS only)"),
        torch_xla=_acts(MEM + "test_memory_metrics_per_stage", note="process RSS only; the XLA devices' memory is not "
                        "measured")),
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
    "fsdp": per_backend(torch=_acts("tests/backends/torch/test_distributed.py::test_fsdp_matches_one_process_with_doubled_batch",
                                    REAL + "test_fsdp.py::test_fsdp_values_read_as_transformers_maps_them"),
                        jax=_acts(REAL + "test_fsdp.py::test_jax_full_shard_shards_parameters_over_all_devices",
                                  note="an fsdp mesh axis over all devices (hybrid_shard: data over hosts); "
                                       "shard_grad_op says once that XLA schedules the gathers"),
                        torch_xla=_acts(REAL + "test_fsdp.py::test_torch_xla_full_shard_shards_parameters_over_all_devices",
                                        note="an fsdp mesh axis over all devices")),
    "fsdp_config": per_backend(torch=_acts(BACK + "test_fsdp_config_layer_classes",
                                           REAL + "test_fsdp_config.py::test_reshard_after_forward",
                                           REAL + "test_fsdp_config.py::test_min_num_params_wraps_every_module_above_the_threshold",
                                           REAL + "test_fsdp_config.py::test_sharded_state_dict_checkpoints",
                                           note="every key FSDP2 has; FSDP1-only keys say once that they do nothing"),
                               jax=_acts(REAL + "test_fsdp_config.py::test_jax_min_num_params_and_activation_checkpointing",
                                         note="min_num_params and activation_checkpointing act; keys the SPMD "
                                              "partitioner decides itself say so once"),
                               torch_xla=_acts(REAL + "test_fsdp.py::test_torch_xla_full_shard_shards_parameters_over_all_devices",
                                               note="min_num_params and activation_checkpointing act; keys the SPMD "
                                                    "partitioner decides itself say so once")),
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
