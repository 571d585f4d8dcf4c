"""`TrainingArguments` and `Seq2SeqTrainingArguments`: the run configuration a `Trainer` reads.

Field names, defaults and string values follow transformers 5.x, so scripts written for the Hugging Face
Trainer (and `HfArgumentParser` command lines, and saved `training_args` JSON) keep working. A few names that
transformers 4.x accepted and 5.x removed are still accepted here with a `DeprecationWarning` and mapped onto
their 5.x replacement. xtrainer adds the fields that pick a backend and describe the device mesh.
"""

import dataclasses
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union

from .args_checks import BACKENDS, LOG_LEVELS, validate
from .sharding import MESH_AXES
from .training_args_setters import TrainingArgumentsSetters
from .accelerator_config import AcceleratorConfig
from .trainer_utils import (
    DebugOption,
    HubStrategy,
    IntervalStrategy,
    OptimizerNames,
    SaveStrategy,
    SchedulerType,
    TrainSamplingStrategy,
)

logger = logging.getLogger(__name__)


# v4 names removed in transformers 5 that are still accepted; they are reset to None once mapped, and left
# out of `to_dict()`. `logging_dir` and `gradient_checkpointing*` stay real attributes.
_REMOVED_ALIASES = (
    "warmup_ratio",
    "evaluation_strategy",
    "group_by_length",
    "tpu_num_cores",
    "overwrite_output_dir",
    "no_cuda",
)


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


def _flag_help(text: str) -> dict:
    # `bool | None` fields: a bare `--flag` on the command line means True (as transformers does).
    return {"help": text, "nargs": "?", "const": True}


def _coerce_json_strings(value):
    """Turns "true"/"1"/"0.5" strings inside a JSON-parsed dict into bool/int/float, as transformers does."""
    if isinstance(value, dict):
        return {k: _coerce_json_strings(v) for k, v in value.items()}
    if isinstance(value, str):
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        if value.isdigit():
            return int(value)
        if value.replace(".", "", 1).isdigit():
            return float(value)
    return value


def _to_enum(enum_cls, value, arg: str):
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"`{arg}`={value!r} is not supported; choose one of: {valid}.") from None


def _dtypes_to_str(d: dict) -> None:
    """torch.dtype values under a `dtype` key (at any depth) -> "float32", as transformers serialises them."""
    if d.get("dtype") is not None and not isinstance(d["dtype"], str):
        d["dtype"] = str(d["dtype"]).split(".")[-1]
    for value in d.values():
        if isinstance(value, dict):
            _dtypes_to_str(value)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"`{old}` is deprecated (removed in transformers 5); use `{new}` instead.", DeprecationWarning, stacklevel=5
    )


@dataclass
class TrainingArguments(TrainingArgumentsSetters):
    """The arguments of a training/evaluation run, named and defaulted as in transformers 5.x.

    Extra xtrainer fields: `backend`, `mesh`, `tpu_config`, `sharding_rules`, `jax_compilation_cache_dir`,
    `async_checkpointing`, `jax_heartbeat_timeout`,
    and the torch_xla static-shape policy `xla_pad_batches`, `xla_seq_bucket`, `xla_max_graphs`, `xla_on_recompile`.
    `nan_policy` ("raise" | "skip" | "ignore") says what a step with a NaN/inf loss or grad norm does (nan_policy.py).
    Dict-typed fields also accept a JSON string (as on the command line).
    """

    # Fields that also take a JSON string (command lines), as transformers' _VALID_DICT_FIELDS.
    _DICT_FIELDS = (
        "accelerator_config",
        "deepspeed",
        "lr_scheduler_kwargs",
        "fsdp_config",
        "activation_checkpointing_kwargs",
        "gradient_checkpointing_kwargs",
    )

    # --- transformers 5.x fields, in transformers' order (so --help, to_dict and to_json_string read alike) ---
    output_dir: str | None = field(default=None, metadata=_help("Where checkpoints and outputs are written."))
    per_device_train_batch_size: int = field(default=8, metadata=_help("Training batch size per device."))
    num_train_epochs: float = field(default=3.0, metadata=_help("Total number of training epochs."))
    max_steps: int = field(default=-1, metadata=_help("If > 0: total optimizer steps; overrides num_train_epochs."))
    learning_rate: float = field(default=5e-5, metadata=_help("Initial learning rate."))
    lr_scheduler_type: SchedulerType | str = field(default="linear", metadata=_help("Learning rate schedule."))
    lr_scheduler_kwargs: dict | str | None = field(default=None, metadata=_help("Extra scheduler arguments."))
    warmup_steps: float = field(
        default=0, metadata=_help("Warmup steps; a float in (0, 1) is a ratio of the total steps.")
    )
    optim: OptimizerNames | str = field(default="adamw_torch_fused", metadata=_help("Optimizer to use."))
    optim_args: str | None = field(default=None, metadata=_help("Extra optimizer arguments, 'k1=v1,k2=v2'."))
    weight_decay: float = field(default=0.0, metadata=_help("Weight decay (not applied to biases and norms)."))
    adam_beta1: float = field(default=0.9, metadata=_help("Adam beta1."))
    adam_beta2: float = field(default=0.999, metadata=_help("Adam beta2."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("Adam epsilon."))
    optim_target_modules: None | str | list[str] = field(
        default=None, metadata=_help("Modules the optimizer targets (GaLore, APOLLO): names or regexes.")
    )
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches accumulated per update."))
    average_tokens_across_devices: bool = field(
        default=True, metadata=_help("Average the token count across devices for the loss normalisation.")
    )
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm; 0 disables clipping."))
    label_smoothing_factor: float = field(default=0.0, metadata=_help("Label smoothing; 0 disables it."))
    bf16: bool = field(default=False, metadata=_help("bfloat16 mixed precision."))
    fp16: bool = field(default=False, metadata=_help("float16 mixed precision."))
    bf16_full_eval: bool = field(default=False, metadata=_help("Evaluate fully in bfloat16."))
    fp16_full_eval: bool = field(default=False, metadata=_help("Evaluate fully in float16."))
    tf32: bool | None = field(default=None, metadata=_help("Allow TF32 matmuls on Ampere+ GPUs."))
    activation_checkpointing: bool | None = field(
        default=None, metadata=_flag_help("Recompute activations in the backward pass to save memory.")
    )
    activation_checkpointing_kwargs: dict | str | None = field(
        default=None, metadata=_help("Options for activation checkpointing.")
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata=_flag_help("Deprecated alias of `activation_checkpointing`.")
    )
    gradient_checkpointing_kwargs: dict | str | None = field(
        default=None, metadata=_help("Deprecated alias of `activation_checkpointing_kwargs`.")
    )
    torch_compile: bool = field(default=False, metadata=_help("Compile the model with torch.compile (torch)."))
    torch_compile_backend: str | None = field(default=None, metadata=_help("torch.compile backend; implies it."))
    torch_compile_mode: str | None = field(default=None, metadata=_help("torch.compile mode; implies it."))
    use_liger_kernel: bool = field(default=False, metadata=_help("Patch the model with Liger kernels (torch, CUDA)."))
    liger_kernel_config: dict | None = field(default=None, metadata=_help("Options passed to the Liger kernel patch."))
    use_cache: bool = field(default=False, metadata=_help("Keep the model's KV cache on during training."))
    neftune_noise_alpha: float | None = field(
        default=None, metadata=_help("NEFTune: add uniform noise of this scale to the input embeddings in training.")
    )
    torch_empty_cache_steps: int | None = field(
        default=None, metadata=_help("Empty the accelerator's memory cache every N steps (torch); None never does.")
    )
    auto_find_batch_size: bool = field(
        default=False, metadata=_help("Halve the training batch size on an out-of-memory error until a step fits.")
    )
    logging_strategy: IntervalStrategy | str = field(default="steps", metadata=_help("When to log: no/steps/epoch."))
    logging_steps: float = field(default=500, metadata=_help("Log every N steps; (0, 1) is a ratio of total."))
    logging_first_step: bool = field(default=False, metadata=_help("Also log the first step."))
    log_on_each_node: bool = field(default=True, metadata=_help("Log from the main process of every node."))
    logging_nan_inf_filter: bool = field(default=True, metadata=_help("Skip NaN/inf losses when logging."))
    include_num_input_tokens_seen: str | bool = field(
        default="no", metadata=_help("Track input tokens seen: 'all', 'non_padding' or 'no'.")
    )
    log_level: str = field(
        default="passive", metadata=_help("Log level of the main process.", choices=list(LOG_LEVELS))
    )
    log_level_replica: str = field(
        default="warning", metadata=_help("Log level of replica processes.", choices=list(LOG_LEVELS))
    )
    disable_tqdm: bool | None = field(default=None, metadata=_help("Disable progress bars."))
    report_to: None | str | list[str] = field(
        default="none", metadata=_help("Integrations to report to; 'all' or 'none'.")
    )
    run_name: str | None = field(default=None, metadata=_help("Run name for the reporting integrations."))
    project: str = field(default="huggingface", metadata=_help("Project name for the logging integrations (Trackio)."))
    trackio_space_id: str | None = field(default=None, metadata=_help("Hugging Face Space id for Trackio logging."))
    trackio_bucket_id: str | None = field(default=None, metadata=_help("Bucket id for Trackio logging."))
    trackio_static_space_id: Union[str, None, Literal[False]] = field(
        default=None, metadata=_help("Static read-only Trackio Space, or False for none.")
    )
    eval_strategy: IntervalStrategy | str = field(default="no", metadata=_help("When to evaluate: no/steps/epoch."))
    eval_steps: float | None = field(default=None, metadata=_help("Evaluate every N steps; defaults to logging_steps."))
    eval_delay: float = field(default=0, metadata=_help("Epochs or steps to wait before the first evaluation."))
    per_device_eval_batch_size: int = field(default=8, metadata=_help("Evaluation batch size per device."))
    prediction_loss_only: bool = field(default=False, metadata=_help("Only return the loss when evaluating."))
    eval_on_start: bool = field(default=False, metadata=_help("Evaluate once before training starts."))
    eval_do_concat_batches: bool = field(default=True, metadata=_help("Concatenate eval outputs across batches."))
    eval_use_gather_object: bool = field(
        default=False, metadata=_help("Gather arbitrary Python objects from all devices in evaluation.")
    )
    eval_accumulation_steps: int | None = field(
        default=None, metadata=_help("Eval steps to accumulate on device before moving outputs to the host.")
    )
    include_for_metrics: list[str] = field(
        default_factory=list, metadata=_help("Extra data for compute_metrics: 'inputs', 'loss'.")
    )
    batch_eval_metrics: bool = field(default=False, metadata=_help("Compute metrics batch by batch."))
    save_only_model: bool = field(default=False, metadata=_help("Save weights only (no optimizer/RNG state)."))
    save_strategy: SaveStrategy | str = field(default="steps", metadata=_help("When to save: no/steps/epoch/best."))
    save_steps: float = field(default=500, metadata=_help("Save every N steps; (0, 1) is a ratio of total."))
    save_on_each_node: bool = field(default=False, metadata=_help("Save on every node, not only the main one."))
    save_total_limit: int | None = field(default=None, metadata=_help("Keep at most N checkpoints."))
    enable_jit_checkpoint: bool = field(
        default=False, metadata=_help("On SIGTERM, finish the step, save a checkpoint and exit (preemption).")
    )
    push_to_hub: bool = field(default=False, metadata=_help("Push the model to the Hub every time it is saved."))
    hub_token: str | None = field(default=None, metadata=_help("Token for pushing to the Hub."))
    hub_private_repo: bool | None = field(default=None, metadata=_help("Make the Hub repository private."))
    hub_model_id: str | None = field(default=None, metadata=_help("Hub repository kept in sync with output_dir."))
    hub_strategy: HubStrategy | str = field(
        default="every_save",
        metadata=_help("What to push and when: 'end', 'every_save', 'checkpoint', 'all_checkpoints'."),
    )
    hub_always_push: bool = field(default=False, metadata=_help("Push even while a previous push is unfinished."))
    hub_revision: str | None = field(default=None, metadata=_help("Branch, tag or commit to push to."))
    load_best_model_at_end: bool = field(default=False, metadata=_help("Load the best checkpoint after training."))
    metric_for_best_model: str | None = field(default=None, metadata=_help("Metric that ranks checkpoints."))
    greater_is_better: bool | None = field(default=None, metadata=_help("Whether a larger metric is better."))
    ignore_data_skip: bool = field(default=False, metadata=_help("Do not fast-forward the data when resuming."))
    restore_callback_states_from_checkpoint: bool = field(
        default=False, metadata=_help("Restore callback states saved in the checkpoint.")
    )
    full_determinism: bool = field(default=False, metadata=_help("Deterministic algorithms (slow; debugging)."))
    seed: int = field(default=42, metadata=_help("Random seed set at the start of training."))
    data_seed: int | None = field(default=None, metadata=_help("Seed of the data samplers; defaults to seed."))
    use_cpu: bool = field(default=False, metadata=_help("Run on CPU even when an accelerator is present."))
    accelerator_config: dict | str | None = field(default=None, metadata=_help("Accelerate options (dict or JSON file)."))
    parallelism_config: Any = field(default=None, metadata=_help("Accelerate ParallelismConfig (context/tensor parallel)."))
    dataloader_drop_last: bool = field(default=False, metadata=_help("Drop the last incomplete batch."))
    dataloader_num_workers: int = field(default=0, metadata=_help("Data loading worker processes."))
    dataloader_pin_memory: bool = field(default=True, metadata=_help("Pin host memory in the DataLoader."))
    dataloader_persistent_workers: bool = field(default=False, metadata=_help("Keep workers alive across epochs."))
    dataloader_prefetch_factor: int | None = field(default=None, metadata=_help("Batches prefetched per worker."))
    dataloader_multiprocessing_context: str | None = field(
        default=None,
        metadata=_help("Start method of data loading workers.", choices=["fork", "spawn", "forkserver"]),
    )
    dataloader_in_order: bool = field(
        default=True, metadata=_help("Yield worker batches in dispatch order (False: as soon as ready).")
    )
    remove_unused_columns: bool = field(default=True, metadata=_help("Drop columns the model does not take."))
    label_names: list[str] | None = field(default=None, metadata=_help("Input keys that hold the labels."))
    train_sampling_strategy: str = field(  # a str with choices, as transformers types it (an enum after init)
        default="random",
        metadata=_help("Training sampler: random, sequential or group_by_length.",
                       choices=["random", "sequential", "group_by_length"]),
    )
    length_column_name: str = field(default="length", metadata=_help("Precomputed length column."))
    ddp_find_unused_parameters: bool | None = field(default=None, metadata=_help("DDP find_unused_parameters."))
    ddp_bucket_cap_mb: int | None = field(default=None, metadata=_help("DDP bucket_cap_mb."))
    ddp_broadcast_buffers: bool | None = field(default=None, metadata=_help("DDP broadcast_buffers."))
    ddp_static_graph: bool | None = field(default=None, metadata=_help("DDP static_graph."))
    ddp_backend: str | None = field(
        default=None,
        metadata=_help("torch.distributed backend.", choices=["nccl", "gloo", "mpi", "xccl", "hccl", "cncl", "mccl"]),
    )
    ddp_timeout: int = field(default=1800, metadata=_help("Process group timeout in seconds."))
    fsdp: str | None = field(default=None, metadata=_flag_help("Enable FSDP (torch backends)."))
    fsdp_config: dict | str | None = field(default=None, metadata=_help("FSDP options: a dict or JSON file path."))
    deepspeed: dict | str | None = field(default=None, metadata=_help("DeepSpeed config (dict or JSON file)."))
    debug: str | list[DebugOption] = field(
        default="", metadata=_help("Debug features: 'underflow_overflow', 'tpu_metrics_debug'.")
    )
    skip_memory_metrics: bool = field(default=True, metadata=_help("Skip memory profiling metrics."))
    do_train: bool = field(default=False, metadata=_help("Run training (read by scripts, not the Trainer)."))
    do_eval: bool = field(default=False, metadata=_help("Run evaluation (read by scripts, not the Trainer)."))
    do_predict: bool = field(default=False, metadata=_help("Run prediction (read by scripts, not the Trainer)."))
    resume_from_checkpoint: str | None = field(default=None, metadata=_help("Checkpoint folder to resume from."))
    local_rank: int = field(default=-1, metadata=_help("Set by old launchers; prefer the LOCAL_RANK variable."))

    # --- xtrainer's own fields ---
    nan_policy: str = field(
        default="ignore",
        metadata=_help("Non-finite loss/grad_norm: 'raise' (stop, naming the step), 'skip' (skip the update), 'ignore'.",
                       choices=["raise", "skip", "ignore"]),
    )
    allow_unsafe_checkpoint_load: bool = field(
        default=False,
        metadata=_help(
            "Unpickle checkpoint .pt/.pth/.bin files fully (weights_only=False) when the safe weights-only loader "
            "refuses them. Unpickling runs code stored in the file: enable only for checkpoints you trust."
        ),
    )
    async_checkpointing: bool = field(
        default=False,
        metadata=_help("Write checkpoints in a background thread: the step loop pays only the copy to host memory "
                       "(xtrainer; torch and jax backends)."),
    )
    jax_heartbeat_timeout: int = field(
        default=60,
        metadata=_help("Multi-host JAX: seconds after which the other processes stop when one stopped responding "
                       "(xtrainer; jax.distributed's heartbeat timeout)."),
    )
    backend: str = field(default="auto", metadata=_help("Training backend.", choices=list(BACKENDS)))
    mesh: dict | str | None = field(
        default=None, metadata=_help('Device mesh axis sizes, e.g. {"data": -1, "fsdp": 1, "tensor": 1}.')
    )
    tpu_config: str | None = field(
        default=None, metadata=_help("TPU preset name (tpu_configs/, e.g. 'v5e-1') or path of a preset YAML file.")
    )
    sharding_rules: list | str | None = field(
        default=None, metadata=_help("[[param_regex, partition_spec], ...] rules for parameter sharding.")
    )
    jax_compilation_cache_dir: str | None = field(default=None, metadata=_help("Persistent JAX compile cache."))
    # torch_xla static-shape policy; None means the XTRAINER_XLA_* environment variable, else the default.
    xla_pad_batches: bool | None = field(default=None, metadata=_help("torch_xla: pad batches to static shapes (default true)."))
    xla_seq_bucket: str | None = field(default=None, metadata=_help('torch_xla: sequence bucket: "pow2", a multiple, or "none".'))
    xla_max_graphs: int | None = field(default=None, metadata=_help("torch_xla: train-step graphs before the recompilation guard fires (8)."))
    xla_on_recompile: str | None = field(default=None, metadata=_help('torch_xla: "warn" or "raise" past xla_max_graphs.'))

    # --- names of transformers 4.x / earlier 5.x (mapped onto their current field, with a DeprecationWarning) ---
    warmup_ratio: float | None = field(default=None, metadata=_help("Deprecated: use warmup_steps < 1."))
    evaluation_strategy: str | None = field(default=None, metadata=_help("Deprecated: use eval_strategy."))
    group_by_length: bool | None = field(
        default=None, metadata=_flag_help("Deprecated: use train_sampling_strategy='group_by_length'.")
    )
    tpu_num_cores: int | None = field(default=None, metadata=_help('Deprecated: use mesh={"data": N}.'))
    overwrite_output_dir: bool | None = field(default=None, metadata=_flag_help("Deprecated: has no effect."))
    no_cuda: bool | None = field(default=None, metadata=_flag_help("Deprecated: use use_cpu."))
    logging_dir: str | None = field(default=None, metadata=_help("Deprecated: TensorBoard log directory."))

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = "trainer_output"
            logger.info("No output_dir given; using 'trainer_output'.")
        self.output_dir = os.path.expanduser(str(self.output_dir))

        for name in self._DICT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str) and value.lstrip().startswith("{"):
                setattr(self, name, _coerce_json_strings(json.loads(value)))

        self._map_deprecated()

        if self.activation_checkpointing is None:
            self.activation_checkpointing = False
        self.gradient_checkpointing = self.activation_checkpointing
        self.gradient_checkpointing_kwargs = self.activation_checkpointing_kwargs

        if self.disable_tqdm is None:
            self.disable_tqdm = logger.getEffectiveLevel() > logging.WARNING
        if isinstance(self.debug, str):
            self.debug = [DebugOption(s) for s in self.debug.split()]
        elif self.debug is None:
            self.debug = []
        else:
            self.debug = [DebugOption(s) for s in self.debug]
        self.hub_strategy = _to_enum(HubStrategy, self.hub_strategy, "hub_strategy")
        self.accelerator_config = AcceleratorConfig.from_value(self.accelerator_config)
        steps = (self.accelerator_config.gradient_accumulation_kwargs or {}).get("num_steps")
        if steps is not None:  # transformers lets accelerate's kwargs set the accumulation
            if self.gradient_accumulation_steps > 1:
                raise ValueError(
                    "accelerator_config's gradient_accumulation_kwargs sets num_steps and gradient_accumulation_steps is "
                    "greater than 1: set only one of them."
                )
            self.gradient_accumulation_steps = int(steps)
        if self.torch_empty_cache_steps is not None and not (
            isinstance(self.torch_empty_cache_steps, int) and not isinstance(self.torch_empty_cache_steps, bool)
            and self.torch_empty_cache_steps > 0
        ):
            raise ValueError(f"`torch_empty_cache_steps` must be a positive integer or None, got {self.torch_empty_cache_steps!r}.")
        if isinstance(self.include_num_input_tokens_seen, bool):
            self.include_num_input_tokens_seen = "all" if self.include_num_input_tokens_seen else "no"
        if isinstance(self.fsdp, str) and self.fsdp.lower() in ("true", "false", ""):
            self.fsdp = self.fsdp.lower() == "true" or None

        self.eval_strategy = _to_enum(IntervalStrategy, self.eval_strategy, "eval_strategy")
        self.logging_strategy = _to_enum(IntervalStrategy, self.logging_strategy, "logging_strategy")
        self.save_strategy = _to_enum(SaveStrategy, self.save_strategy, "save_strategy")
        self.lr_scheduler_type = _to_enum(SchedulerType, self.lr_scheduler_type, "lr_scheduler_type")
        self.optim = _to_enum(OptimizerNames, self.optim, "optim")
        self.train_sampling_strategy = _to_enum(
            TrainSamplingStrategy, self.train_sampling_strategy, "train_sampling_strategy"
        )

        if not self.do_eval and self.eval_strategy != IntervalStrategy.NO:
            self.do_eval = True
        if self.eval_strategy == IntervalStrategy.STEPS and not self.eval_steps:
            if not self.logging_steps or self.logging_steps <= 0:
                raise ValueError("eval_strategy='steps' needs a positive `eval_steps` (or `logging_steps`).")
            self.eval_steps = self.logging_steps
        needs_metric = self.load_best_model_at_end or self.lr_scheduler_type in (SchedulerType.REDUCE_ON_PLATEAU, SchedulerType.GREEDY)
        if needs_metric and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")

        if self.report_to in (None, "none", ["none"]):
            self.report_to = []
        elif isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        else:
            self.report_to = list(self.report_to)
        if "all" in self.report_to:  # as in transformers: every installed integration
            from .integrations import available_integrations

            self.report_to = available_integrations()
        from .integrations.kubeflow import kubeflow_requested

        if kubeflow_requested() and "kubeflow" not in self.report_to:  # inside a Kubeflow TrainJob, as transformers
            self.report_to = [*self.report_to, "kubeflow"]

        if (self.torch_compile_backend is not None or self.torch_compile_mode is not None) and not self.torch_compile:
            self.torch_compile = True
        if self.torch_compile and self.torch_compile_backend is None:
            self.torch_compile_backend = "inductor"
        if self.use_cpu:
            self.dataloader_pin_memory = False

        self.mesh = self._parse_mesh(self.mesh)
        self.sharding_rules = self._parse_sharding_rules(self.sharding_rules)
        if self.tpu_config is not None:
            from .tpu_presets import load_preset

            load_preset(self.tpu_config)  # unknown or invalid preset: ValueError naming the valid ones
        self._validate()
        # Multi-host JAX must start before any model touches a device; scripts build their
        # arguments first, so this is the earliest point the trainer controls.
        from .backends.registry import early_setup

        early_setup(self)

    # ------------------------------------------------------------------ deprecated v4 names
    def _map_deprecated(self) -> None:
        if self.warmup_ratio is not None:
            _deprecated("warmup_ratio", "warmup_steps (a float in [0, 1) is a ratio of the total steps)")
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio}; set `warmup_steps`.")
            if self.warmup_steps:
                logger.warning("Both warmup_steps and warmup_ratio given; warmup_steps wins (as in transformers 4).")
            else:
                self.warmup_steps = self.warmup_ratio
        if self.evaluation_strategy is not None:
            _deprecated("evaluation_strategy", "eval_strategy")
            new = _to_enum(IntervalStrategy, self.evaluation_strategy, "evaluation_strategy")
            if IntervalStrategy(self.eval_strategy) not in (IntervalStrategy.NO, new):
                raise ValueError(
                    f"`evaluation_strategy`={new.value!r} conflicts with `eval_strategy`="
                    f"{str(self.eval_strategy)!r}; pass only `eval_strategy`."
                )
            self.eval_strategy = new
        if self.group_by_length is not None:
            _deprecated("group_by_length", "train_sampling_strategy='group_by_length'")
            if self.group_by_length:
                if str(self.train_sampling_strategy) not in ("random", "group_by_length"):
                    raise ValueError(
                        "`group_by_length`=True conflicts with `train_sampling_strategy`="
                        f"{str(self.train_sampling_strategy)!r}; pass only `train_sampling_strategy`."
                    )
                self.train_sampling_strategy = "group_by_length"
        if self.activation_checkpointing is None and self.gradient_checkpointing is not None:
            _deprecated("gradient_checkpointing", "activation_checkpointing")
            self.activation_checkpointing = self.gradient_checkpointing
        if self.activation_checkpointing_kwargs is None and self.gradient_checkpointing_kwargs is not None:
            _deprecated("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")
            self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs
        if self.tpu_num_cores is not None:
            _deprecated("tpu_num_cores", 'mesh={"data": N}')
            if self.mesh is not None:
                raise ValueError("`tpu_num_cores` and `mesh` were both given; pass only `mesh`.")
            self.mesh = {"data": self.tpu_num_cores}
        if self.overwrite_output_dir is not None:
            _deprecated("overwrite_output_dir", "nothing (it has no effect; checkpoints are resumed explicitly)")
        if self.no_cuda is not None:
            _deprecated("no_cuda", "use_cpu")
            self.use_cpu = self.use_cpu or bool(self.no_cuda)
        if self.logging_dir is not None:
            _deprecated("logging_dir", "the TENSORBOARD_LOGGING_DIR environment variable (still honoured here)")
            self.logging_dir = os.path.expanduser(self.logging_dir)
        for name in _REMOVED_ALIASES:
            setattr(self, name, None)

    # ------------------------------------------------------------------ xtrainer fields
    @staticmethod
    def _parse_mesh(mesh):
        if mesh is None:
            return None
        if isinstance(mesh, str):
            try:
                mesh = json.loads(mesh)
            except json.JSONDecodeError:
                raise ValueError(f'`mesh` must be a dict or JSON like \'{{"data": -1}}\', got {mesh!r}.') from None
        if not isinstance(mesh, dict):
            raise ValueError(f"`mesh` must map axis names to sizes, got {mesh!r}.")
        mesh = _coerce_json_strings(dict(mesh))
        unknown = sorted(set(mesh) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"`mesh` has unknown axes {unknown}; allowed axes are {list(MESH_AXES)}.")
        for axis, size in mesh.items():
            if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
                raise ValueError(f"`mesh` axis {axis!r} must be a positive int or -1 (the rest), got {size!r}.")
        if sum(size == -1 for size in mesh.values()) > 1:
            raise ValueError(f"`mesh` may use -1 for at most one axis, got {mesh}.")
        return mesh

    @staticmethod
    def _parse_sharding_rules(rules):
        if rules is None:
            return None
        if isinstance(rules, str):
            try:
                rules = json.loads(rules)
            except json.JSONDecodeError:
                raise ValueError(f"`sharding_rules` must be a list or a JSON string, got {rules!r}.") from None
        if not isinstance(rules, (list, tuple)):
            raise ValueError("`sharding_rules` must be a list of [regex, partition_spec] pairs.")
        parsed = []
        for rule in rules:
            if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
                raise ValueError(f"`sharding_rules` entries must be [regex, partition_spec] pairs, got {rule!r}.")
            try:
                re.compile(rule[0])
            except re.error as err:
                raise ValueError(f"`sharding_rules` pattern {rule[0]!r} is not a valid regex: {err}.") from None
            spec = rule[1]
            if not isinstance(spec, (list, tuple)) or not all(
                s is None or isinstance(s, str) or (isinstance(s, (list, tuple)) and all(isinstance(a, str) for a in s))
                for s in spec
            ):
                raise ValueError(
                    f"`sharding_rules` partition spec for {rule[0]!r} must be a list of axis names/None, got {spec!r}."
                )
            parsed.append([rule[0], [list(s) if isinstance(s, tuple) else s for s in spec]])
        return parsed

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        validate(self)
        if self.deepspeed or self.use_liger_kernel:  # fields no backend runs: refuse them now, not at train()
            from .args_support import refused_everywhere

            problems = refused_everywhere(self)
            if problems:
                raise ValueError("\n".join(problems))

    # ------------------------------------------------------------------ this process (see process_layout.py)
    @property
    def device(self):
        """The torch device of this process (cuda:LOCAL_RANK, cpu, or the XLA device; cpu on jax, where the
        mesh places the model, so `model.to(args.device)` in a transformers script is harmless)."""
        from .process_layout import torch_device

        return torch_device(self)

    @property
    def n_gpu(self) -> int:
        """GPUs this process drives."""
        from .process_layout import gpus_used

        return gpus_used(self)

    @property
    def parallel_mode(self):
        from .process_layout import parallel_mode

        return parallel_mode(self)

    @property
    def world_size(self) -> int:
        """Processes in the run."""
        from .process_layout import process_layout

        return process_layout(self).world_size

    @property
    def process_index(self) -> int:
        from .process_layout import process_layout

        return process_layout(self).process_index

    @property
    def local_process_index(self) -> int:
        from .process_layout import process_layout

        return process_layout(self).local_process_index

    @property
    def train_batch_size(self) -> int:
        """Training batch size of this process per device group: per_device_train_batch_size x max(1, n_gpu)."""
        return self.per_device_train_batch_size * max(1, self.n_gpu)

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size * max(1, self.n_gpu)

    @property
    def ddp_timeout_delta(self):
        import datetime

        return datetime.timedelta(seconds=self.ddp_timeout)

    @property
    def place_model_on_device(self) -> bool | None:
        """transformers' hook for integrations that place the model themselves; None (the Trainer decides)."""
        return None

    @property
    def _no_sync_in_gradient_accumulation(self) -> bool:
        return not self.deepspeed

    @property
    def should_log(self) -> bool:
        """Whether this process logs: the main process, or each node's with log_on_each_node."""
        return (self.local_process_index if self.log_on_each_node else self.process_index) == 0

    @property
    def should_save(self) -> bool:
        """Whether this process writes files: the main process, or each node's with save_on_each_node."""
        return (self.local_process_index if self.save_on_each_node else self.process_index) == 0

    def main_process_first(self, local: bool = True, desc: str = "work"):
        """Context manager: the main process (of each node with local=True) runs the block first, then the
        others; a real barrier across the run's processes on every backend."""
        from .process_layout import main_process_first

        return main_process_first(self, local=local, desc=desc)

    def get_process_log_level(self) -> int:
        """The log level for this process: `log_level` on the main one, `log_level_replica` elsewhere."""
        level = LOG_LEVELS[self.log_level if self.should_log else self.log_level_replica]
        return logging.getLogger("xtrainer").getEffectiveLevel() if level == -1 else level

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """Warmup steps: `warmup_steps` itself when >= 1, else that ratio of the total steps (rounded up)."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return math.ceil(num_training_steps * self.warmup_steps)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The init fields as JSON-friendly values: enums as their strings, `*_token` values masked."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.init or f.name in _REMOVED_ALIASES:
                continue
            value = getattr(self, f.name)
            if isinstance(value, Enum):
                value = value.value
            elif isinstance(value, list) and value and isinstance(value[0], Enum):
                value = [v.value for v in value]
            elif isinstance(value, os.PathLike):
                value = os.fspath(value)
            if f.name.endswith("_token"):  # masked whether set or not, as transformers writes it
                value = f"<{f.name.upper()}>"
            if isinstance(value, AcceleratorConfig):
                value = value.to_dict()
            if f.name == "parallelism_config" and hasattr(value, "to_json"):
                value = value.to_json()
            out[f.name] = value
        _dtypes_to_str(out)
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_sanitized_dict(self) -> dict[str, Any]:
        """A flat dict of bool/int/float/str values (others stringified), e.g. for TensorBoard hparams."""
        d = {**self.to_dict(), "train_batch_size": self.train_batch_size, "eval_batch_size": self.eval_batch_size}
        return {k: v if type(v) in (bool, int, float, str) else str(v) for k, v in d.items()}

    def __str__(self) -> str:
        body = "".join(f"{k}={v!r},\n" for k, v in sorted(self.to_dict().items()))
        return f"{type(self).__name__}(\n{body})"

    __repr__ = __str__


@dataclass
class Seq2SeqTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the generation settings of sequence-to-sequence evaluation."""

    sortish_sampler: bool = field(
        default=False,
        metadata=_help(
            "Sortish sampling: random batches of similar lengths (less padding). In xtrainer this selects "
            "train_sampling_strategy='group_by_length' when the strategy is the default 'random'."
        ),
    )
    predict_with_generate: bool = field(default=False, metadata=_help("Use generate() for eval/predict metrics."))
    generation_max_length: int | None = field(default=None, metadata=_help("max_length for generate() in eval."))
    generation_num_beams: int | None = field(default=None, metadata=_help("num_beams for generate() in eval."))
    generation_config: str | Path | None = field(
        default=None, metadata=_help("GenerationConfig, or a model id/path to load one from.")
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("generation_max_length", "generation_num_beams"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1 or None, got {value}.")
        if self.sortish_sampler:
            # transformers 5 keeps the flag but no longer acts on it; its old SortishSampler shuffled, then
            # sorted by length within chunks, which is what the length-grouped sampler does.
            strategy = str(getattr(self.train_sampling_strategy, "value", self.train_sampling_strategy))
            if strategy == "random":
                self.train_sampling_strategy = TrainSamplingStrategy("group_by_length")
            elif strategy != "group_by_length":
                warnings.warn(
                    f"sortish_sampler=True is ignored: train_sampling_strategy={strategy!r} was chosen explicitly.",
                    UserWarning,
                    stacklevel=2,
                )

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        for k, v in d.items():
            # A transformers GenerationConfig (duck-typed so transformers stays optional).
            if hasattr(v, "to_dict") and type(v).__name__ == "GenerationConfig":
                d[k] = v.to_dict()
        return d


__all__ = ["TrainingArguments", "Seq2SeqTrainingArguments"]
