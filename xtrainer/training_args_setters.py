"""transformers' grouped setters of TrainingArguments (`args.set_training(...)`, `args.set_save(...)`, ...).

Each sets a group of related fields with transformers' parameter names and defaults, and returns the
arguments so calls chain: `TrainingArguments("out").set_training(learning_rate=1e-4).set_save(steps=100)`.
"""

from __future__ import annotations

import warnings

from .trainer_utils import HubStrategy, IntervalStrategy, OptimizerNames, SaveStrategy, SchedulerType


def _interval(strategy, steps, enum_cls, what: str):
    value = enum_cls(strategy)
    if value.value == "steps" and steps == 0:
        raise ValueError(f"{what} strategy 'steps' needs a positive number of `steps`.")
    return value


class TrainingArgumentsSetters:
    """The grouped setters; mixed into TrainingArguments."""

    def set_training(self, learning_rate: float = 5e-5, batch_size: int = 8, weight_decay: float = 0,
                     num_epochs: float = 3, max_steps: int = -1, gradient_accumulation_steps: int = 1,
                     seed: int = 42, activation_checkpointing: bool = False, gradient_checkpointing: bool | None = None):
        """Training: learning rate, per-device batch size, weight decay, epochs / max_steps, accumulation, seed,
        activation checkpointing. Sets do_train."""
        self.do_train = True
        self.learning_rate = learning_rate
        self.per_device_train_batch_size = batch_size
        self.weight_decay = weight_decay
        self.num_train_epochs = num_epochs
        self.max_steps = max_steps
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.seed = seed
        if gradient_checkpointing is not None:
            warnings.warn("`gradient_checkpointing` is deprecated; use `activation_checkpointing`.", FutureWarning,
                          stacklevel=2)
        self.activation_checkpointing = self.gradient_checkpointing = activation_checkpointing
        return self

    def set_evaluate(self, strategy: str | IntervalStrategy = "no", steps: int = 500, batch_size: int = 8,
                     accumulation_steps: int | None = None, delay: float | None = None, loss_only: bool = False):
        """Evaluation: strategy and interval, per-device batch size, accumulation, delay, loss only."""
        self.eval_strategy = _interval(strategy, steps, IntervalStrategy, "Evaluation")
        self.do_eval = self.eval_strategy != IntervalStrategy.NO
        self.eval_steps = steps
        self.per_device_eval_batch_size = batch_size
        self.eval_accumulation_steps = accumulation_steps
        self.eval_delay = delay
        self.prediction_loss_only = loss_only
        return self

    def set_testing(self, batch_size: int = 8, loss_only: bool = False):
        """Prediction on a held-out set: per-device batch size, loss only. Sets do_predict."""
        self.do_predict = True
        self.per_device_eval_batch_size = batch_size
        self.prediction_loss_only = loss_only
        return self

    def set_save(self, strategy: str | SaveStrategy = "steps", steps: int = 500, total_limit: int | None = None,
                 on_each_node: bool = False):
        """Checkpoints: strategy and interval, how many to keep, whether every node writes its own."""
        self.save_strategy = _interval(strategy, steps, SaveStrategy, "Save")
        self.save_steps = steps
        self.save_total_limit = total_limit
        self.save_on_each_node = on_each_node
        return self

    def set_logging(self, strategy: str | IntervalStrategy = "steps", steps: int = 500,
                    report_to: str | list[str] = "none", level: str = "passive", first_step: bool = False,
                    nan_inf_filter: bool = False, on_each_node: bool = False, replica_level: str = "passive"):
        """Logging: strategy and interval, integrations, log levels, first step, NaN/inf filter, per node."""
        self.logging_strategy = _interval(strategy, steps, IntervalStrategy, "Logging")
        self.logging_steps = steps
        self.report_to = report_to
        self.log_level = level
        self.logging_first_step = first_step
        self.logging_nan_inf_filter = nan_inf_filter
        self.log_on_each_node = on_each_node
        self.log_level_replica = replica_level
        return self

    def set_push_to_hub(self, model_id: str, strategy: str | HubStrategy = "every_save", token: str | None = None,
                        private_repo: bool | None = None, always_push: bool = False, revision: str | None = None):
        """Hub synchronisation: repository, strategy, token, privacy, push policy, revision. Sets push_to_hub."""
        self.push_to_hub = True
        self.hub_model_id = model_id
        self.hub_strategy = HubStrategy(strategy)
        self.hub_token = token
        self.hub_private_repo = private_repo
        self.hub_always_push = always_push
        self.hub_revision = revision
        return self

    def set_optimizer(self, name: str | OptimizerNames = "adamw_torch", learning_rate: float = 5e-5,
                      weight_decay: float = 0, beta1: float = 0.9, beta2: float = 0.999, epsilon: float = 1e-8,
                      args: str | None = None):
        """The optimizer and its hyperparameters."""
        self.optim = OptimizerNames(name)
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.adam_beta1 = beta1
        self.adam_beta2 = beta2
        self.adam_epsilon = epsilon
        self.optim_args = args
        return self

    def set_lr_scheduler(self, name: str | SchedulerType = "linear", num_epochs: float = 3.0, max_steps: int = -1,
                         warmup_steps: float = 0):
        """The learning-rate schedule and the run length it spans."""
        self.lr_scheduler_type = SchedulerType(name)
        self.num_train_epochs = num_epochs
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        return self

    def set_dataloader(self, train_batch_size: int = 8, eval_batch_size: int = 8, drop_last: bool = False,
                       num_workers: int = 0, pin_memory: bool = True, persistent_workers: bool = False,
                       prefetch_factor: int | None = None, multiprocessing_context: str | None = None,
                       in_order: bool = True, auto_find_batch_size: bool = False, ignore_data_skip: bool = False,
                       sampler_seed: int | None = None):
        """Data loading: batch sizes, last batch, workers and their options, batch-size search, data skip, seed."""
        self.per_device_train_batch_size = train_batch_size
        self.per_device_eval_batch_size = eval_batch_size
        self.dataloader_drop_last = drop_last
        self.dataloader_num_workers = num_workers
        self.dataloader_pin_memory = pin_memory
        self.dataloader_persistent_workers = persistent_workers
        self.dataloader_prefetch_factor = prefetch_factor
        self.dataloader_multiprocessing_context = multiprocessing_context
        self.dataloader_in_order = in_order
        self.auto_find_batch_size = auto_find_batch_size
        self.ignore_data_skip = ignore_data_skip
        self.data_seed = sampler_seed
        return self
