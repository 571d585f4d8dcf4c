"""What every TrainingArguments field does on each backend: the decision table, and the warnings it drives.

For every field and every backend (jax, torch, torch_xla) there is one decision:

- `Acts`: the field changes behaviour as in transformers; `tests` name the tests (on that backend)
  that fail if it is ignored.
- `NoEffect`: the field has no meaning on that backend. Setting it to a non-default value logs one
  warning per run (per Trainer) that names the field, the backend and what to use instead.
- `Refused`: setting it fails when the arguments (or the Trainer) are built, saying why and what to
  use instead (args_checks.check_requirements, or the backend's prepare).

`apply_to_run` is the Trainer's one call once its backend is known: it checks the requirements for
that backend, applies the process-level settings transformers' Trainer applies (the xtrainer log
level, TF32, deterministic kernels, use_cache, Liger kernels, the underflow/overflow detector) and
logs the NoEffect warnings. docs/training_arguments.md is generated from this table:
`python -m xtrainer.args_support > docs/training_arguments.md`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

BACKEND_NAMES = ("jax", "torch", "torch_xla")


@dataclass(frozen=True)
class Acts:
    """(a) Changes behaviour as in transformers; `tests` fail if the field is ignored."""

    tests: tuple[str, ...]
    how: str = ""


@dataclass(frozen=True)
class NoEffect:
    """(b) No meaning on this backend: a non-default value warns once per run, naming `instead`."""

    why: str
    instead: str


@dataclass(frozen=True)
class Refused:
    """Setting the field fails at construction with this reason (and what to use instead)."""

    why: str
    tests: tuple[str, ...]


Decision = Acts | NoEffect | Refused

# ---------------------------------------------------------------------------------------------- test files
_LOOP = "tests/args_support/test_loop_fields.py"
_EVAL = "tests/args_support/test_eval_fields.py"
_OPTIM = "tests/args_support/test_optimizer_fields.py"
_MODEL = "tests/args_support/test_model_fields.py"
_PROC = "tests/args_support/test_process_fields.py"
_MULTI = "tests/args_support/test_multiprocess_fields.py"
_ARGS = "tests/unit/test_training_args.py"
_REAL = "tests/args_real"

#: Test files that other helpers add on their branches (the lead empties this after merging them).
PENDING_TESTS: frozenset[str] = frozenset({
    f"{_REAL}/test_label_smoothing_factor.py",
    f"{_REAL}/test_neftune_noise_alpha.py",
    f"{_REAL}/test_torch_empty_cache_steps.py",
    f"{_REAL}/test_full_determinism.py",
    f"{_REAL}/test_bf16_full_eval.py",
    f"{_REAL}/test_fp16_full_eval.py",
    f"{_REAL}/test_fsdp.py",
    f"{_REAL}/test_fsdp_config.py",
    f"{_REAL}/test_auto_find_batch_size.py",
    f"{_REAL}/test_dataloader_fields.py",
    f"{_REAL}/test_hub_fields.py",
    f"{_REAL}/test_skip_memory_metrics.py",
    f"{_REAL}/test_optim_fields.py",
})


def _per_backend(*tests: str, how: str = "", only: tuple[str, ...] = BACKEND_NAMES) -> dict[str, Decision]:
    """Acts on the `only` backends, each with the tests formatted for it ("{b}" is the backend name)."""
    return {b: Acts(tuple(t.format(b=b) for t in tests), how) for b in only}


def _same(decision: Decision) -> dict[str, Decision]:
    return dict.fromkeys(BACKEND_NAMES, decision)


def _real(field: str, how: str, only: tuple[str, ...] = BACKEND_NAMES) -> dict[str, Decision]:
    """A field another helper makes real, tested in tests/args_real/test_<field>.py."""
    return _per_backend(f"{_REAL}/test_{field}.py", how=how, only=only)


_JAX_NO_TORCH_DIST = NoEffect(
    "JAX runs without torch.distributed: its processes join through jax.distributed",
    "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (or jax.distributed.initialize())",
)
_XLA_NO_TORCH_DIST = NoEffect(
    "torch_xla drives every device of the host from one process (SPMD): there is no process group",
    "mesh={...} to shard the batch over the devices",
)
_NO_TRACKIO = NoEffect("xtrainer has no Trackio integration", "report_to='tensorboard', 'jsonl' or 'wandb'")


def _precision(p: str, only=BACKEND_NAMES) -> dict[str, Decision]:
    return {b: Acts((f"{_MODEL}::test_mixed_precision_computes_in_half[{b}-{p}]",),
                    f"matmuls run in {'bfloat16' if p == 'bf16' else 'float16'}, weights stay float32") for b in only}


# The decision table. Keys: every field of Seq2SeqTrainingArguments (transformers' fields, xtrainer's,
# and the 4.x aliases); values: backend -> decision.
SUPPORT: dict[str, dict[str, Decision]] = {
    # --- output, duration, batch size
    "output_dir": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]"),
    "per_device_train_batch_size": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]",
                                                how="x the devices of the batch axes (data x fsdp) on jax/torch_xla"),
    "num_train_epochs": _per_backend(f"{_LOOP}::test_epochs_order_and_columns[{{b}}]"),
    "max_steps": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]"),
    # --- optimizer and schedule
    "learning_rate": _per_backend(f"{_OPTIM}::test_adamw_hyperparameters_reach_the_update[{{b}}]"),
    "lr_scheduler_type": _real("optim_fields", "the shared schedules (xtrainer/schedules.py)"),
    "lr_scheduler_kwargs": _real("optim_fields", "the shared schedules (xtrainer/schedules.py)"),
    "warmup_steps": _per_backend(f"{_OPTIM}::test_adamw_hyperparameters_reach_the_update[{{b}}]"),
    "optim": _real("optim_fields", "torch.optim / optax implementations"),
    "optim_args": _real("optim_fields", "passed to the optimizer"),
    "weight_decay": _per_backend(f"{_OPTIM}::test_adamw_hyperparameters_reach_the_update[{{b}}]",
                                 how="not on biases and norm weights, as in transformers"),
    "adam_beta1": _per_backend(f"{_OPTIM}::test_adamw_hyperparameters_reach_the_update[{{b}}]"),
    "adam_beta2": _per_backend(f"{_OPTIM}::test_adamw_hyperparameters_reach_the_update[{{b}}]"),
    "adam_epsilon": _per_backend(f"{_OPTIM}::test_adamw_hyperparameters_reach_the_update[{{b}}]"),
    "optim_target_modules": _real("optim_fields", "GaLore/APOLLO-style optimizers"),
    "gradient_accumulation_steps": _per_backend(f"{_OPTIM}::test_adamw_hyperparameters_reach_the_update[{{b}}]",
                                                how="jax: one compiled step scans the window"),
    "average_tokens_across_devices": {
        "torch": Acts((f"{_MODEL}::test_average_tokens_across_devices_scales_the_loss",),
                      "the label-token count is summed over processes and the loss scaled by the world size"),
        "jax": NoEffect("the JAX step normalises the loss over the global batch of every device in one program",
                        "nothing: the token count always spans every device"),
        "torch_xla": NoEffect("torch_xla runs one SPMD program over every device, so the count spans them all",
                              "nothing: the token count always spans every device"),
    },
    "max_grad_norm": _per_backend(f"{_OPTIM}::test_adamw_hyperparameters_reach_the_update[{{b}}]"),
    "label_smoothing_factor": {
        "torch": Acts(("tests/parity/test_hf_trainer_parity.py::test_label_smoothing_matches_hf",
                       f"{_MODEL}::test_label_smoothing_changes_the_loss[torch]")),
        "torch_xla": Acts((f"{_MODEL}::test_label_smoothing_changes_the_loss[torch_xla]",)),
        "jax": Acts((f"{_REAL}/test_label_smoothing_factor.py",), "equal to the torch backend's loss"),
    },
    # --- precision, memory, compilation
    "bf16": _precision("bf16"),
    "fp16": {
        **_precision("fp16", only=("jax", "torch")),
        "torch_xla": Refused("XLA's half type is bfloat16: fp16=True fails when the Trainer is built; use bf16=True",
                             (f"{_MODEL}::test_fp16_is_refused_on_torch_xla",)),
    },
    "bf16_full_eval": _real("bf16_full_eval", "evaluation runs in bfloat16"),
    "fp16_full_eval": _real("fp16_full_eval", "evaluation runs in float16"),
    "tf32": {
        "torch": Acts((f"{_MODEL}::test_tf32_sets_the_cuda_matmul_mode",),
                      "sets torch's CUDA matmul/cuDNN TF32 switches; without a CUDA device it warns that it does nothing"),
        "jax": NoEffect("XLA chooses the matmul precision of each platform itself",
                        "jax.config.update('jax_default_matmul_precision', 'tensorfloat32' or 'float32')"),
        "torch_xla": NoEffect("XLA chooses the matmul precision of each platform itself",
                              "torch_xla.backends.set_mat_mul_precision('default' | 'high' | 'highest')"),
    },
    "activation_checkpointing": _per_backend(
        f"{_MODEL}::test_activation_checkpointing_reaches_the_model[{{b}}]",
        how="jax: the loss is rematerialised (jax.checkpoint); torch: gradient_checkpointing_enable()"),
    "activation_checkpointing_kwargs": {
        **_per_backend(f"{_MODEL}::test_activation_checkpointing_reaches_the_model[{{b}}]", only=("torch", "torch_xla"),
                       how="passed to gradient_checkpointing_enable()"),
        "jax": NoEffect("the JAX step rematerialises the whole loss with jax.checkpoint, which takes no options here",
                        "activation_checkpointing=True alone (nnx.remat inside the model for finer control)"),
    },
    "gradient_checkpointing": _per_backend(f"{_ARGS}::test_gradient_checkpointing_attribute_mirrors_new_name",
                                           f"{_MODEL}::test_activation_checkpointing_reaches_the_model[{{b}}]",
                                           how="deprecated alias of activation_checkpointing"),
    "gradient_checkpointing_kwargs": {
        **_per_backend(f"{_ARGS}::test_v4_alias_warns_and_maps", only=("torch", "torch_xla"),
                       how="deprecated alias of activation_checkpointing_kwargs"),
        "jax": NoEffect("alias of activation_checkpointing_kwargs, which JAX's rematerialisation does not take",
                        "activation_checkpointing=True alone"),
    },
    "torch_compile": {
        "torch": Acts((f"{_MODEL}::test_torch_compile_options_reach_torch_compile",)),
        "jax": NoEffect("every JAX step is compiled by XLA already", "nothing: the step is always compiled"),
        "torch_xla": NoEffect("torch_xla compiles every step with XLA already", "nothing: the step is always compiled"),
    },
    "torch_compile_backend": {
        "torch": Acts((f"{_MODEL}::test_torch_compile_options_reach_torch_compile",)),
        "jax": NoEffect("every JAX step is compiled by XLA already", "nothing: the step is always compiled"),
        "torch_xla": NoEffect("torch_xla compiles every step with XLA already", "nothing: the step is always compiled"),
    },
    "torch_compile_mode": {
        "torch": Acts((f"{_MODEL}::test_torch_compile_options_reach_torch_compile",)),
        "jax": NoEffect("every JAX step is compiled by XLA already", "nothing: the step is always compiled"),
        "torch_xla": NoEffect("torch_xla compiles every step with XLA already", "nothing: the step is always compiled"),
    },
    "use_liger_kernel": {
        "torch": Acts((f"{_MODEL}::test_liger_kernel_is_applied_with_its_config",),
                      "liger_kernel's patch is applied to the model (needs liger-kernel and a CUDA GPU)"),
        "jax": Refused("Liger's Triton kernels patch CUDA torch modules; XLA fuses the model's operations itself",
                       (f"{_ARGS}::test_requirements_fail_at_construction",)),
        "torch_xla": Refused("Liger's Triton kernels patch CUDA torch modules; XLA fuses the model's operations itself",
                             (f"{_ARGS}::test_requirements_fail_at_construction",)),
    },
    "liger_kernel_config": {
        "torch": Acts((f"{_MODEL}::test_liger_kernel_is_applied_with_its_config",)),
        "jax": NoEffect("Liger kernels are refused on jax", "nothing"),
        "torch_xla": NoEffect("Liger kernels are refused on torch_xla", "nothing"),
    },
    "use_cache": _per_backend(f"{_MODEL}::test_use_cache_sets_the_model_config[{{b}}]",
                              how="sets model.config.use_cache, as transformers' Trainer does"),
    "neftune_noise_alpha": _real("neftune_noise_alpha", "noise on the input embeddings in training"),
    "torch_empty_cache_steps": _real("torch_empty_cache_steps", "empties the device memory cache every N steps"),
    "auto_find_batch_size": _real("auto_find_batch_size", "halves the batch on out-of-memory"),
    # --- logging
    "logging_strategy": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]"),
    "logging_steps": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]"),
    "logging_first_step": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]"),
    "log_on_each_node": _per_backend(f"{_PROC}::test_log_levels_on_main_and_replica_processes[{{b}}]",
                                     "tests/backends/jax/test_multihost.py::test_two_processes_match_one_process",
                                     f"{_MULTI}::test_two_torch_nodes",
                                     how="picks the processes that log at log_level"),
    "logging_nan_inf_filter": _per_backend(f"{_LOOP}::test_nan_losses_in_the_logs[{{b}}]"),
    "include_num_input_tokens_seen": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]"),
    "log_level": _per_backend(f"{_PROC}::test_log_levels_on_main_and_replica_processes[{{b}}]",
                              how="the level of the 'xtrainer' logger on the main process"),
    "log_level_replica": _per_backend(f"{_PROC}::test_log_levels_on_main_and_replica_processes[{{b}}]",
                                      "tests/backends/jax/test_multihost.py::test_two_processes_match_one_process",
                                      how="the level of the 'xtrainer' logger on the other processes"),
    "disable_tqdm": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]"),
    "report_to": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]",
                              "tests/integration/test_report_to.py::test_tensorboard_event_files_hold_the_logged_scalars",
                              how="tensorboard, jsonl, wandb, kubeflow"),
    "run_name": _per_backend("tests/integration/test_report_to.py::test_wandb_offline_run",
                             how="the run name of the wandb integration (front code, the same on every backend)"),
    "project": _same(NoEffect("only Trackio reads it, and xtrainer has no Trackio integration",
                              "WANDB_PROJECT for wandb")),
    "trackio_space_id": _same(_NO_TRACKIO),
    "trackio_bucket_id": _same(_NO_TRACKIO),
    "trackio_static_space_id": _same(_NO_TRACKIO),
    # --- evaluation
    "eval_strategy": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]"),
    "eval_steps": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]"),
    "eval_delay": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]"),
    "per_device_eval_batch_size": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]"),
    "prediction_loss_only": _per_backend(f"{_EVAL}::test_evaluation_fields[{{b}}]"),
    "eval_on_start": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]"),
    "eval_do_concat_batches": _per_backend(f"{_EVAL}::test_evaluation_fields[{{b}}]"),
    "eval_use_gather_object": _same(NoEffect(
        "every process evaluates the whole dataset, so nothing is gathered after evaluation",
        "nothing: compute_metrics receives every prediction on every process")),
    "eval_accumulation_steps": _per_backend(f"{_EVAL}::test_evaluation_fields[{{b}}]"),
    "include_for_metrics": _per_backend(f"{_EVAL}::test_evaluation_fields[{{b}}]"),
    "batch_eval_metrics": _per_backend(f"{_EVAL}::test_evaluation_fields[{{b}}]"),
    # --- checkpoints
    "save_only_model": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]"),
    "save_strategy": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]",
                                  f"{_LOOP}::test_best_model_is_tracked_and_loaded[{{b}}]"),
    "save_steps": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]"),
    "save_on_each_node": {
        "torch": Acts((f"{_MULTI}::test_two_torch_nodes", f"{_PROC}::test_should_save_follows_save_on_each_node"),
                      "the first process of every node writes a whole checkpoint into its own output_dir"),
        "jax": NoEffect("all hosts write their shards of one checkpoint together (orbax) into one output_dir",
                        "an output_dir on storage every host sees (GCS, NFS)"),
        "torch_xla": NoEffect("torch_xla runs one process per host, and one host", "nothing: it writes every checkpoint"),
    },
    "save_total_limit": _per_backend(f"{_LOOP}::test_log_eval_save_schedule[{{b}}]"),
    "enable_jit_checkpoint": {
        **_per_backend("tests/fault/test_sigterm.py::test_sigterm_saves_exits_143_and_resumes_exactly[{b}]",
                       f"{_LOOP}::test_sigterm_is_left_alone_without_enable_jit_checkpoint[{{b}}]",
                       only=("jax", "torch"), how="SIGTERM: save this step's checkpoint and exit with 143"),
        "torch_xla": Acts((f"{_LOOP}::test_sigterm_is_left_alone_without_enable_jit_checkpoint[torch_xla]",),
                          "SIGTERM: save this step's checkpoint and exit with 143"),
    },
    # --- hub
    **{name: _real("hub_fields", "uploads to the Hub") for name in (
        "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push",
        "hub_revision")},
    # --- best model, resume, seeds
    "load_best_model_at_end": _per_backend(f"{_LOOP}::test_best_model_is_tracked_and_loaded[{{b}}]"),
    "metric_for_best_model": _per_backend(f"{_LOOP}::test_best_model_is_tracked_and_loaded[{{b}}]"),
    "greater_is_better": _per_backend(f"{_LOOP}::test_best_model_is_tracked_and_loaded[{{b}}]"),
    "ignore_data_skip": _per_backend(f"{_LOOP}::test_resume_fields[{{b}}]"),
    "restore_callback_states_from_checkpoint": _per_backend(f"{_LOOP}::test_resume_fields[{{b}}]"),
    "full_determinism": {
        **_per_backend(f"{_MODEL}::test_full_determinism_switches_torch_to_deterministic_kernels[{{b}}]",
                       only=("torch", "torch_xla"), how="torch.use_deterministic_algorithms(True), cuDNN deterministic"),
        "jax": Acts((f"{_REAL}/test_full_determinism.py",), "XLA's deterministic flags"),
    },
    "seed": _per_backend(f"{_LOOP}::test_seed_is_set_when_the_trainer_is_built[{{b}}]"),
    "data_seed": _per_backend(f"{_LOOP}::test_epochs_order_and_columns[{{b}}]"),
    "use_cpu": {
        "torch": Acts(("tests/backends/torch/test_torch_backend.py::test_device_is_chosen_automatically",
                       f"{_PROC}::test_properties_match_transformers_on_one_cpu_process[torch]")),
        "jax": NoEffect("JAX picks its platform when it starts, before any TrainingArguments exist",
                        "JAX_PLATFORMS=cpu in the environment"),
        "torch_xla": NoEffect("torch_xla runs on the XLA device", "backend='torch' to train on the CPU"),
    },
    "accelerator_config": _same(NoEffect(
        "xtrainer does not run on Accelerate: batches are per device, each process loads its own slice",
        "per_device_train_batch_size and gradient_accumulation_steps")),
    "parallelism_config": _same(NoEffect(
        "xtrainer does not run on Accelerate's ParallelismConfig", "mesh={'data': ..., 'fsdp': ..., 'tensor': ...}")),
    # --- data loading
    **{name: _real("dataloader_fields", "the host input pipeline (xtrainer/loaders.py)") for name in (
        "dataloader_drop_last", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
        "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "dataloader_in_order")},
    "remove_unused_columns": _per_backend(f"{_LOOP}::test_epochs_order_and_columns[{{b}}]"),
    "label_names": _per_backend(f"{_EVAL}::test_evaluation_fields[{{b}}]"),
    "train_sampling_strategy": _per_backend(f"{_LOOP}::test_epochs_order_and_columns[{{b}}]",
                                            how="'batch_rebalance' is refused (variable micro-batch sizes)"),
    "length_column_name": _per_backend(f"{_LOOP}::test_epochs_order_and_columns[{{b}}]"),
    # --- distributed
    **{name: {"torch": Acts((f"{_PROC}::test_ddp_options_reach_ddp",)), "jax": _JAX_NO_TORCH_DIST,
              "torch_xla": _XLA_NO_TORCH_DIST}
       for name in ("ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph")},
    **{name: {"torch": Acts((f"{_PROC}::test_process_group_options",)), "jax": _JAX_NO_TORCH_DIST,
              "torch_xla": _XLA_NO_TORCH_DIST}
       for name in ("ddp_backend", "ddp_timeout")},
    "fsdp": _real("fsdp", "jax/torch_xla: an fsdp mesh axis; torch: FSDP2"),
    "fsdp_config": _real("fsdp_config", "jax/torch_xla: sharding threshold; torch: FSDP2 options"),
    "deepspeed": _same(Refused("xtrainer has no DeepSpeed engine; use fsdp (torch) or mesh={'fsdp': -1} (jax, torch_xla)",
                               (f"{_ARGS}::test_requirements_fail_at_construction",))),
    "debug": {
        "torch": Acts((f"{_MODEL}::test_underflow_overflow_debug_hooks_the_model",),
                      "'underflow_overflow' attaches transformers' DebugUnderflowOverflow; 'tpu_metrics_debug' warns"),
        "jax": NoEffect("the detectors are torch module hooks and torch_xla metrics",
                        "nan_policy='raise', or jax.config.update('jax_debug_nans', True)"),
        "torch_xla": NoEffect("activation hooks would sync the device every layer; the metrics are torch_xla's own",
                              "nan_policy='raise', and torch_xla.debug.metrics.metrics_report() / PT_XLA_DEBUG=1"),
    },
    "skip_memory_metrics": _real("skip_memory_metrics", "adds memory figures to the train/eval metrics"),
    # --- read by scripts
    **{name: _per_backend(f"{_ARGS}::test_script_flags_are_kept_for_the_script",
                          how="read by the script (the Trainer ignores it, as transformers' does)")
       for name in ("do_train", "do_eval", "do_predict")},
    "resume_from_checkpoint": _per_backend(f"{_LOOP}::test_resume_fields[{{b}}]",
                                           how="train() resumes from it when given no checkpoint"),
    "local_rank": {
        "torch": Acts((f"{_PROC}::test_local_rank_is_the_fallback_of_local_process_index",)),
        "jax": _JAX_NO_TORCH_DIST,
        "torch_xla": _XLA_NO_TORCH_DIST,
    },
    # --- Seq2SeqTrainingArguments
    "sortish_sampler": _per_backend("tests/integration/test_seq2seq_trainer.py::test_sortish_sampler_groups_by_length_or_warns",
                                    f"{_LOOP}::test_epochs_order_and_columns[{{b}}]",
                                    how="selects train_sampling_strategy='group_by_length'"),
    "predict_with_generate": {
        "torch": Acts(("tests/parity/test_seq2seq_parity.py::test_predict_matches_transformers",
                       "tests/parity/test_seq2seq_parity.py::test_without_predict_with_generate_returns_logits")),
        "jax": Acts(("tests/backends/jax/test_jax_generate.py::test_seq2seq_trainer_predicts_hf_generate_tokens_compiled_once",)),
        "torch_xla": Acts(("tests/parity/test_seq2seq_parity.py::test_torch_xla_tokens_equal_torch",)),
    },
    "generation_max_length": {
        "torch": Acts(("tests/parity/test_seq2seq_parity.py::test_predict_matches_transformers",)),
        "jax": Acts((f"{_EVAL}::test_generation_fields[jax]",)),
        "torch_xla": Acts(("tests/parity/test_seq2seq_parity.py::test_torch_xla_tokens_equal_torch",)),
    },
    "generation_num_beams": {
        "torch": Acts(("tests/parity/test_seq2seq_parity.py::test_predict_matches_transformers",)),
        "jax": Acts((f"{_EVAL}::test_generation_fields[jax]",)),
        "torch_xla": Acts(("tests/parity/test_seq2seq_parity.py::test_torch_xla_tokens_equal_torch",)),
    },
    "generation_config": {
        "torch": Acts(("tests/integration/test_seq2seq_trainer.py::test_generation_config_argument_sets_the_model_config_and_padding",)),
        "jax": Acts((f"{_EVAL}::test_generation_fields[jax]",)),
        "torch_xla": Acts((f"{_EVAL}::test_generation_fields[torch_xla]",)),
    },
    # --- xtrainer's own fields
    "backend": _per_backend("tests/unit/test_backend_selection.py::test_auto_selection",
                            f"{_PROC}::test_properties_match_transformers_on_one_cpu_process[{{b}}]"),
    "mesh": {
        "jax": Acts(("tests/backends/jax/test_mesh.py::test_trainer_rejects_a_mesh_that_does_not_fit_the_devices",
                     "tests/backends/jax/test_mesh.py::test_loss_curve_is_the_same_on_every_mesh")),
        "torch_xla": Acts(("tests/backends/torch_xla/test_torch_xla_backend.py::test_mesh_training_matches_torch_backend",)),
        "torch": NoEffect("the torch backend parallelises over processes (DDP/FSDP2), not over a device mesh",
                          "torchrun --nproc_per_node=N, and fsdp='full_shard' to shard"),
    },
    "tpu_config": {
        "jax": Acts(("tests/unit/test_tpu_presets.py::test_jax_backend_uses_the_preset_mesh_and_checks_devices",)),
        "torch": NoEffect("TPU presets describe JAX meshes", "backend='jax' on a TPU"),
        "torch_xla": NoEffect("TPU presets describe JAX meshes; torch_xla takes its mesh from `mesh`",
                              "mesh={'data': ..., 'fsdp': ..., 'tensor': ...}"),
    },
    "sharding_rules": {
        "jax": Acts(("tests/backends/jax/test_mesh.py::test_parameter_shardings_follow_rules_then_annotations_then_fsdp",)),
        "torch_xla": Acts((f"{_MODEL}::test_sharding_rules_place_torch_xla_parameters",)),
        "torch": NoEffect("the torch backend has no device mesh to shard parameters over", "fsdp='full_shard'"),
    },
    "jax_compilation_cache_dir": {
        "jax": Acts(("tests/backends/jax/test_compilation.py::test_persistent_compilation_cache_is_written_and_reused",)),
        "torch": NoEffect("it is JAX's compile cache", "TORCHINDUCTOR_CACHE_DIR for torch.compile"),
        "torch_xla": NoEffect("it is JAX's compile cache",
                              "torch_xla.runtime.initialize_cache(path) for XLA's persistent cache"),
    },
    **{name: {
        "torch_xla": Acts((f"{_MODEL}::test_xla_static_shape_options_reach_the_backend",)),
        "jax": NoEffect("they steer torch_xla's static-shape padding", "dataloader_drop_last=True and fixed-length padding"),
        "torch": NoEffect("they steer torch_xla's static-shape padding", "nothing: eager torch takes any shape"),
    } for name in ("xla_pad_batches", "xla_seq_bucket", "xla_max_graphs", "xla_on_recompile")},
    "nan_policy": {
        "jax": Acts(("tests/fault/test_nan_policy.py::test_jax_skip_equals_run_without_the_bad_batch_with_no_host_sync",)),
        "torch": Acts(("tests/fault/test_nan_policy.py::test_torch_skip_equals_run_without_the_bad_batch",)),
        "torch_xla": Acts(("tests/fault/test_nan_policy.py::test_torch_xla_skip_and_raise",)),
    },
    "allow_unsafe_checkpoint_load": {
        "torch": Acts(("tests/fault/test_safe_loading.py::test_opt_in_unpickles_fully",)),
        "torch_xla": Acts((f"{_MODEL}::test_torch_xla_reads_checkpoints_with_the_torch_safe_loader",)),
        "jax": NoEffect("JAX checkpoints are orbax arrays, which hold no pickled code", "nothing"),
    },
    # --- transformers 4.x names (mapped onto their 5.x fields when the arguments are built)
    "warmup_ratio": _per_backend(f"{_ARGS}::test_v4_alias_warns_and_maps",
                                 f"{_OPTIM}::test_adamw_hyperparameters_reach_the_update[{{b}}]", how="-> warmup_steps"),
    "evaluation_strategy": _per_backend(f"{_ARGS}::test_v4_alias_warns_and_maps",
                                        f"{_LOOP}::test_log_eval_save_schedule[{{b}}]", how="-> eval_strategy"),
    "group_by_length": _per_backend(f"{_ARGS}::test_v4_alias_warns_and_maps",
                                    f"{_LOOP}::test_epochs_order_and_columns[{{b}}]",
                                    how="-> train_sampling_strategy='group_by_length'"),
    "tpu_num_cores": {
        "jax": Acts((f"{_ARGS}::test_v4_alias_warns_and_maps",
                     "tests/backends/jax/test_mesh.py::test_trainer_rejects_a_mesh_that_does_not_fit_the_devices"),
                    "-> mesh={'data': N}"),
        "torch_xla": Acts((f"{_ARGS}::test_v4_alias_warns_and_maps",
                           "tests/backends/torch_xla/test_torch_xla_backend.py::test_mesh_training_matches_torch_backend"),
                          "-> mesh={'data': N}"),
        "torch": NoEffect("it maps to `mesh`, which the torch backend does not use", "torchrun --nproc_per_node=N"),
    },
    "overwrite_output_dir": _same(NoEffect("transformers 5 removed it: checkpoints are never resumed implicitly",
                                           "resume_from_checkpoint to resume, or another output_dir")),
    "no_cuda": {
        "torch": Acts((f"{_ARGS}::test_v4_alias_warns_and_maps",
                       "tests/backends/torch/test_torch_backend.py::test_device_is_chosen_automatically"), "-> use_cpu"),
        "jax": NoEffect("it maps to use_cpu, which JAX cannot honour once started", "JAX_PLATFORMS=cpu"),
        "torch_xla": NoEffect("it maps to use_cpu; torch_xla runs on the XLA device", "backend='torch'"),
    },
    "logging_dir": _per_backend(f"{_ARGS}::test_v4_alias_warns_and_maps",
                                "tests/integration/test_report_to.py::test_tensorboard_honours_logging_dir",
                                how="the TensorBoard directory (front code, the same on every backend)"),
}


# ---------------------------------------------------------------------------------------------- queries


def decision(field: str, backend: str) -> Decision:
    """The decision for `field` on `backend` (KeyError for an unknown field or backend)."""
    return SUPPORT[field][backend]


def all_test_ids() -> set[str]:
    """Every test id named by an Acts or Refused decision."""
    return {t for per in SUPPORT.values() for d in per.values() if not isinstance(d, NoEffect) for t in d.tests}


def _defaults(args) -> Any:
    """The arguments a plain construction gives (normalised like `args`), to tell which fields were set."""
    kwargs = {"output_dir": args.output_dir, "backend": args.backend}
    try:
        return type(args)(**kwargs)
    except TypeError:  # a subclass with required fields of its own: compare against the base class
        from .training_args import TrainingArguments

        return TrainingArguments(**kwargs)


# Fields whose value is derived from another field when the arguments are built: set only if it differs
# from what the derivation gives (torch_compile=True alone fills in torch_compile_backend="inductor").
_DERIVED_DEFAULTS = {"torch_compile_backend": (None, "inductor")}
# The 4.x names that mirror a 5.x field: one warning, for the 5.x name, when both have no effect.
_MIRRORS = {"gradient_checkpointing": "activation_checkpointing",
            "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}


def _is_set(args, defaults, name: str) -> bool:
    value, default = getattr(args, name, None), getattr(defaults, name, None)
    if name == "accelerator_config" and hasattr(value, "non_default"):
        return bool(value.non_default())
    if name in _DERIVED_DEFAULTS:
        return value not in _DERIVED_DEFAULTS[name]
    return value != default


def inert_settings(args, backend: str) -> list[tuple[str, Any, NoEffect]]:
    """(field, value, decision) for every field set away from its default that has no effect on `backend`."""
    defaults = _defaults(args)
    found = []
    for name, per_backend in SUPPORT.items():
        choice = per_backend.get(backend)
        if not isinstance(choice, NoEffect) or not _is_set(args, defaults, name):
            continue
        if name in _MIRRORS and isinstance(SUPPORT[_MIRRORS[name]].get(backend), NoEffect):
            continue  # its 5.x name warns
        found.append((name, getattr(args, name), choice))
    return found


def no_effect_message(name: str, value: Any, backend: str, choice: NoEffect) -> str:
    shown = value.non_default() if hasattr(value, "non_default") else value
    return (f"TrainingArguments.{name}={shown!r} has no effect on backend={backend!r}: {choice.why}. "
            f"Use instead: {choice.instead}.")


# ---------------------------------------------------------------------------------------------- the Trainer's call


def apply_to_run(args, backend: str, model: Any = None) -> list[str]:
    """Everything the arguments do when a Trainer starts on `backend` (called once, before the model is placed).

    Returns the NoEffect warnings it logged (one per field), for the caller's records.

    Raises:
        ValueError / ImportError: a field this backend refuses, or one whose package is missing.
    """
    from .args_checks import check_requirements

    args._run_backend = backend  # args.device & co. now describe the backend that runs
    check_requirements(args, backend)
    level = args.get_process_log_level()
    chosen = args.log_level if args.should_log else args.log_level_replica
    if chosen != "passive":
        logging.getLogger("xtrainer").setLevel(level)
    if backend in ("torch", "torch_xla"):
        _apply_torch_settings(args, backend)
    if model is not None:
        _apply_model_settings(args, backend, model)
    messages = []
    for name, value, choice in inert_settings(args, backend):
        message = no_effect_message(name, value, backend, choice)
        logger.warning(message)
        messages.append(message)
    return messages


def _apply_torch_settings(args, backend: str) -> None:
    import torch

    if args.tf32 is not None and backend == "torch":
        # What transformers does (the CUDA matmul and cuDNN TF32 switches); they do nothing without a GPU.
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
        torch.backends.cudnn.allow_tf32 = bool(args.tf32)
        if not torch.cuda.is_available() or args.use_cpu:
            logger.warning("TrainingArguments.tf32=%r has no effect on backend='torch' without a CUDA device: TF32 is "
                           "an Ampere+ GPU matmul mode. Use instead: nothing (float32 matmuls on the CPU).", args.tf32)
    if args.full_determinism:
        # cuBLAS needs a fixed workspace to be deterministic; it must be set before the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _apply_model_settings(args, backend: str, model: Any) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = args.use_cache  # transformers' Trainer sets it for training too
    if backend == "torch" and args.use_liger_kernel:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, **(args.liger_kernel_config or {}))
    debug = {getattr(d, "value", d) for d in args.debug}
    if backend == "torch" and "underflow_overflow" in debug:
        from transformers.debug_utils import DebugUnderflowOverflow

        DebugUnderflowOverflow(model)  # registers forward hooks on every submodule
    if backend == "torch" and "tpu_metrics_debug" in debug:
        logger.warning("TrainingArguments.debug='tpu_metrics_debug' has no effect on backend='torch': it reports "
                       "torch_xla metrics. Use instead: backend='torch_xla' with torch_xla.debug.metrics.")


# ---------------------------------------------------------------------------------------------- the docs table


def _cell(choice: Decision) -> str:
    return "acts" if isinstance(choice, Acts) else "refused" if isinstance(choice, Refused) else "no effect"


def _note(choice: Decision) -> str:
    if isinstance(choice, Acts):
        return choice.how
    if isinstance(choice, Refused):
        return f"refused: {choice.why}"
    return f"no effect: {choice.why}; use {choice.instead}"


def _notes_cell(per_backend: dict[str, Decision]) -> str:
    """How the field acts, or why it does not and what to use, once per distinct text (prefixed by its backends)."""
    by_text: dict[str, list[str]] = {}
    for b in BACKEND_NAMES:
        text = _note(per_backend[b])
        if text:
            by_text.setdefault(text, []).append(b)
    if len(by_text) == 1 and len(next(iter(by_text.values()))) == len(BACKEND_NAMES):
        return next(iter(by_text))
    return "<br>".join(f"{'/'.join(names)}: {text}" for text, names in by_text.items())


def _tests_cell(per_backend: dict[str, Decision]) -> str:
    """The tests of a row, with the parametrised ids of one test folded into one entry (test[jax,torch])."""
    params: dict[str, list[str]] = {}
    for b in BACKEND_NAMES:
        choice = per_backend[b]
        if isinstance(choice, NoEffect):
            continue
        for test in choice.tests:
            base, _, param = test.partition("[")
            ids = params.setdefault(base, [])
            if param and param.rstrip("]") not in ids:
                ids.append(param.rstrip("]"))
    return "<br>".join(f"`{base}[{','.join(ids)}]`" if ids else f"`{base}`" for base, ids in params.items())


def summary() -> dict[str, dict[str, int]]:
    """backend -> {"acts": n, "no effect": n, "refused": n}."""
    out = {b: {"acts": 0, "no effect": 0, "refused": 0} for b in BACKEND_NAMES}
    for per_backend in SUPPORT.values():
        for b, choice in per_backend.items():
            key = "acts" if isinstance(choice, Acts) else "refused" if isinstance(choice, Refused) else "no effect"
            out[b][key] += 1
    return out


def markdown_table() -> str:
    """docs/training_arguments.md: the decision for every field on every backend, generated from SUPPORT."""
    from .training_args import Seq2SeqTrainingArguments

    lines = [
        "# TrainingArguments on each backend",
        "",
        "Generated from `xtrainer/args_support.py` by `python -m xtrainer.args_support > docs/training_arguments.md`;",
        "tests/args_support/test_registry.py fails when this file is out of date.",
        "",
        "Every field of transformers 5.x's `TrainingArguments` and `Seq2SeqTrainingArguments`, xtrainer's own",
        "fields and the transformers 4.x names xtrainer still maps. On each backend a field either **acts** as in",
        "transformers (the tests listed fail if it is ignored), has **no effect** there (a non-default value logs",
        "one warning per run naming the field, the backend and what to use instead), or is **refused** (building",
        "the arguments or the Trainer fails with the reason).",
        "",
    ]
    counts = summary()
    lines.append("| backend | acts | no effect | refused |")
    lines.append("| --- | --- | --- | --- |")
    for b in BACKEND_NAMES:
        lines.append(f"| {b} | {counts[b]['acts']} | {counts[b]['no effect']} | {counts[b]['refused']} |")
    lines += ["", "| field | jax | torch | torch_xla | how, or why not and what to use instead | tests |",
              "| --- | --- | --- | --- | --- | --- |"]
    for f in dataclasses.fields(Seq2SeqTrainingArguments):
        per_backend = SUPPORT[f.name]
        cells = [_cell(per_backend[b]) for b in BACKEND_NAMES]
        notes = _notes_cell(per_backend).replace("|", "\\|")
        lines.append(f"| `{f.name}` | " + " | ".join(cells) + f" | {notes} | {_tests_cell(per_backend)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
