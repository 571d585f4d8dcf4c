"""The grouped setters of TrainingArguments (`args.set_training(...)`, `args.set_save(...)`, ...).

Each sets a group of related fields in one call and returns the arguments, so calls chain:
`TrainingArguments("out").set_training(learning_rate=1e-4).set_save(strategy="no")`. The keyword
names and their defaults are transformers' (they are part of its API): a keyword left out is set to
that default, not kept.
"""

from __future__ import annotations

import warnings

from .trainer_utils import HubStrategy, IntervalStrategy, OptimizerNames, SaveStrategy, SchedulerType


def _steps_strategy(enum_cls, strategy, steps, what: str):
    value = enum_cls(strategy)
    if value.value == "steps" and steps == 0:
        raise ValueError(f"{what} strategy 'steps' needs a positive `steps`, got 0.")
    return value


class SettersMixin:
    """set_training, set_evaluate, set_testing, set_save, set_logging, set_push_to_hub, set_optimizer,
    set_lr_scheduler and set_dataloader."""

    def set_training(self, learning_rate: float = 5e-5, batch_size: int = 8, weight_decay: float = 0,
                     num_epochs: float = 3, max_steps: int = -1, gradient_accumulation_steps: int = 1,
                     seed: int = 42, activation_checkpointing: bool = False,
                     gradient_checkpointing: bool | None = None):
        """Training basics; also sets do_train=True.

        Example:
            >>> args = TrainingArguments("out").set_training(learning_rate=1e-4, batch_size=32)
        """
        if gradient_checkpointing is not None:
            warnings.warn("`gradient_checkpointing` is deprecated; use `activation_checkpointing`.", FutureWarning,
                          stacklevel=2)
            activation_checkpointing = gradient_checkpointing
        self.do_train = True
        self.learning_rate, self.weight_decay, self.seed = learning_rate, weight_decay, seed
        self.per_device_train_batch_size = batch_size
        self.num_train_epochs, self.max_steps = num_epochs, max_steps
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.activation_checkpointing = self.gradient_checkpointing = activation_checkpointing
        return self

    def set_evaluate(self, strategy: str | IntervalStrategy = "no", steps: int = 500, batch_size: int = 8,
                     accumulation_steps: int | None = None, delay: float | None = None, loss_only: bool = False):
        """Evaluation during training; do_eval follows the strategy (True unless "no")."""
        self.eval_strategy = _steps_strategy(IntervalStrategy, strategy, steps, "The evaluation")
        self.do_eval = self.eval_strategy != IntervalStrategy.NO
        self.eval_steps, self.per_device_eval_batch_size = steps, batch_size
        self.eval_accumulation_steps, self.eval_delay = accumulation_steps, delay
        self.prediction_loss_only = loss_only
        return self

    def set_testing(self, batch_size: int = 8, loss_only: bool = False):
        """Prediction on held-out data; also sets do_predict=True."""
        self.do_predict = True
        self.per_device_eval_batch_size, self.prediction_loss_only = batch_size, loss_only
        return self

    def set_save(self, strategy: str | SaveStrategy = "steps", steps: int = 500, total_limit: int | None = None,
                 on_each_node: bool = False):
        """Checkpoint saving."""
        self.save_strategy = _steps_strategy(SaveStrategy, strategy, steps, "The save")
        self.save_steps, self.save_total_limit, self.save_on_each_node = steps, total_limit, on_each_node
        return self

    def set_logging(self, strategy: str | IntervalStrategy = "steps", steps: int = 500,
                    report_to: str | list[str] = "none", level: str = "passive", first_step: bool = False,
                    nan_inf_filter: bool = False, on_each_node: bool = False, replica_level: str = "passive"):
        """Logging: when, where to report, and the log levels of the main process and the replicas."""
        self.logging_strategy = _steps_strategy(IntervalStrategy, strategy, steps, "The logging")
        self.logging_steps, self.report_to = steps, report_to
        self.log_level, self.log_level_replica = level, replica_level
        self.logging_first_step, self.logging_nan_inf_filter = first_step, nan_inf_filter
        self.log_on_each_node = on_each_node
        return self

    def set_push_to_hub(self, model_id: str, strategy: str | HubStrategy = "every_save", token: str | None = None,
                        private_repo: bool | None = None, always_push: bool = False, revision: str | None = None):
        """Hub synchronisation of output_dir; also sets push_to_hub=True."""
        self.push_to_hub, self.hub_model_id, self.hub_strategy = True, model_id, HubStrategy(strategy)
        self.hub_token, self.hub_private_repo = token, private_repo
        self.hub_always_push, self.hub_revision = always_push, revision
        return self

    def set_optimizer(self, name: str | OptimizerNames = "adamw_torch", learning_rate: float = 5e-5,
                      weight_decay: float = 0, beta1: float = 0.9, beta2: float = 0.999, epsilon: float = 1e-8,
                      args: str | None = None):
        """The optimizer and its hyperparameters."""
        self.optim = OptimizerNames(name)
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.adam_beta1, self.adam_beta2, self.adam_epsilon = beta1, beta2, epsilon
        self.optim_args = args
        return self

    def set_lr_scheduler(self, name: str | SchedulerType = "linear", num_epochs: float = 3.0, max_steps: int = -1,
                         warmup_steps: float = 0):
        """The learning-rate schedule and the run length it spans."""
        self.lr_scheduler_type = SchedulerType(name)
        self.num_train_epochs, self.max_steps, self.warmup_steps = num_epochs, max_steps, warmup_steps
        return self

    def set_dataloader(self, train_batch_size: int = 8, eval_batch_size: int = 8, drop_last: bool = False,
                       num_workers: int = 0, pin_memory: bool = True, persistent_workers: bool = False,
                       prefetch_factor: int | None = None, multiprocessing_context: str | None = None,
                       in_order: bool = True, auto_find_batch_size: bool = False, ignore_data_skip: bool = False,
                       sampler_seed: int | None = None):
        """Batch sizes and data loading; `sampler_seed` sets data_seed."""
        self.per_device_train_batch_size, self.per_device_eval_batch_size = train_batch_size, eval_batch_size
        self.dataloader_drop_last, self.dataloader_num_workers = drop_last, num_workers
        self.dataloader_pin_memory, self.dataloader_persistent_workers = pin_memory, persistent_workers
        self.dataloader_prefetch_factor = prefetch_factor
        self.dataloader_multiprocessing_context, self.dataloader_in_order = multiprocessing_context, in_order
        self.auto_find_batch_size, self.ignore_data_skip, self.data_seed = auto_find_batch_size, ignore_data_skip, sampler_seed
        return self


__all__ = ["SettersMixin"]
