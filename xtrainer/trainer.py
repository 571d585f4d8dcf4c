"""The Trainer front: the one training loop, evaluation, prediction, checkpoints and best-model tracking.

It owns no device code. Everything that touches a device goes through the Backend chosen once in
`__init__` (see backends/base.py). Batches come from the backend-neutral host pipeline (data.py,
loaders.py) as numpy arrays. Device metrics are read back only when a log is written, so the hot
loop never waits on the device.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from . import checkpoint as ckpt
from .args_checks import check_eval_dataset, check_output_dir
from .args_support import report_unsupported
from .auto_batch import train_with_batch_search
from . import checkpoint_writer, data, data_state, preemption
from .backends import get_backend, resolve_backend_name
from .backends.base import EvalOutput
from .callbacks import (
    CallbackHandler,
    DefaultFlowCallback,
    PrinterCallback,
    ProgressCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    restore_callback_states,
)
from .compat import flops, hub, metrics_report
from .compat.accelerator import AcceleratorView
from .compat.banner import install_default_handler, log_training_banner
from .compat.memory import MemoryTracker
from .compat.resume_checks import warn_on_mismatched_arguments
from .data_workers import options_from_args
from .hooks import TrainerHooks
from .loaders import DatasetLoader
from .integrations import reporting_callbacks
from .loop_support import LossTracker, StepEvents, prefetch_to_device, speed_metrics
from .nan_policy import NanMonitor
from .optimizers import check_optimizer_setup, scheduler_needs_metric
from .throughput import ThroughputMeter
from .user_loaders import as_loader
from .trainer_utils import (
    EvalLoopOutput,
    EvalPrediction,
    PredictionOutput,
    SaveStrategy,
    TrainOutput,
    set_seed,
    sorted_checkpoints,
)
from .training_args import TrainingArguments

logger = logging.getLogger(__name__)


class Trainer:
    """A drop-in for transformers' `Trainer`: same constructor, methods, callbacks and files.

    Example:
        >>> trainer = Trainer(model=model, args=TrainingArguments("out", max_steps=10), train_dataset=ds)
        >>> trainer.train()
    """

    #: Weigh each eval batch's loss by the full eval batch size, short last batch included (transformers'
    #: Seq2SeqTrainer does); False weighs it by its real rows (transformers' Trainer).
    eval_loss_full_batch_weight = False

    #: Set by a subclass whose compute_loss already normalises the loss over the whole accumulation
    #: window (True) or returns a per-batch mean (False); None lets the Trainer decide (transformers' rule).
    loss_is_scaled_for_ga: bool | None = None

    def __init__(
        self,
        model: Any = None,
        args: TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Callable | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple[type, dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        **deprecated,
    ):
        if "tokenizer" in deprecated:  # transformers 4's name; transformers 5 dropped it
            warnings.warn("Trainer(tokenizer=...) is deprecated (removed in transformers 5); use processing_class=...",
                          DeprecationWarning, stacklevel=2)
            processing_class = processing_class or deprecated.pop("tokenizer")
        if deprecated:
            raise TypeError(f"Trainer got unexpected keyword arguments: {sorted(deprecated)}")
        self.args = args if args is not None else TrainingArguments(output_dir="trainer_output")
        # log_level on the main process, log_level_replica elsewhere, for xtrainer's loggers (as transformers
        # sets its own library's verbosity).
        logging.getLogger("xtrainer").setLevel(self.args.get_process_log_level())
        install_default_handler()  # log_level="info" shows without a logging setup, as transformers' logs do
        # skip_memory_metrics=False: memory used by __init__, train, evaluate and predict (compat/memory.py).
        self._memory_tracker = MemoryTracker(None, skip=self.args.skip_memory_metrics)
        set_seed(self.args.seed, deterministic=self.args.full_determinism)
        self.model_init = model_init
        if model is None:
            if model_init is None:
                raise ValueError("Trainer needs either a `model` or a `model_init` function.")
            model = self._call_model_init()
        elif model_init is not None:
            raise ValueError("Trainer takes either a `model` or a `model_init` function, not both.")
        if model_init is not None and any(o is not None for o in optimizers):
            # The optimizer would hold the parameters of a model that train() replaces (HF refuses it too).
            raise RuntimeError(
                "`model_init` cannot be combined with `optimizers`: train() re-creates the model, and the given "
                "optimizer would keep updating the old one's parameters. Subclass Trainer to build the optimizer."
            )
        if optimizer_cls_and_kwargs is not None and any(o is not None for o in optimizers):
            raise RuntimeError("Pass either `optimizers` or `optimizer_cls_and_kwargs`, not both: they both choose the optimizer.")
        check_eval_dataset(self.args, eval_dataset)
        self.compute_loss_func = compute_loss_func
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        self.label_names = self.args.label_names
        self.backend = get_backend(resolve_backend_name(self.args.backend, model))
        self._memory_tracker.backend = self.backend
        self._memory_tracker.start("__init__")
        # The user's overrides reach the backend through this object; a backend that cannot honour
        # one refuses it here, in prepare, instead of training without it.
        self.hooks = TrainerHooks(self)
        # Fields the chosen backend cannot honour: an error, or one warning each (args_support.py).
        report_unsupported(self.args, self.backend.name)
        self.model = self.backend.prepare(model, self.args, hooks=self.hooks)
        self.model_wrapped = self.model
        _apply_use_cache(self.model, self.args.use_cache)
        # args.optim that cannot run here, a metric-driven schedule no metric reaches: refused before training.
        check_optimizer_setup(self.args, self.backend.name, getattr(getattr(self.backend, "device", None), "type", None),
                              optimizers, optimizer_cls_and_kwargs,
                              default_optimizer=not any(self.hooks.overrides(name) for name in
                                                        ("create_optimizer", "get_optimizer_cls_and_kwargs")))
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.processing_class = processing_class
        self.data_collator = data_collator or _default_collator(processing_class)
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.optimizers = optimizers
        self.optimizer, self.lr_scheduler = optimizers
        self._created_lr_scheduler = False
        self.label_names = self.args.label_names or self.backend.default_label_names()
        self._init_compat_attributes()
        self._backend_state = None
        # Same order as transformers: flow control, report_to integrations, the user's callbacks, then progress.
        progress = PrinterCallback if self.args.disable_tqdm else ProgressCallback
        reporters = reporting_callbacks(self.args.report_to, self.is_world_process_zero())
        backend_callbacks = getattr(self.backend, "extra_callbacks", list)()  # e.g. torch_xla's metrics report
        self.callback_handler = CallbackHandler(
            [DefaultFlowCallback, *reporters, *backend_callbacks, *(callbacks or []), progress], self.model,
            processing_class, *optimizers,
        )
        self.state = TrainerState(
            is_local_process_zero=self.is_local_process_zero(), is_world_process_zero=self.is_world_process_zero()
        )
        self.control = TrainerControl()
        self.is_in_train = False
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)
        if self.args.push_to_hub:  # the repository exists (or the Hub is unreachable) before any training
            self.init_hf_repo()
        self._memory_tracker.stop("__init__")

    # ------------------------------------------------------------------ small API

    def add_callback(self, callback) -> None:
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        self.callback_handler.remove_callback(callback)

    def is_local_process_zero(self) -> bool:
        return self.backend.process_index == 0

    def is_world_process_zero(self) -> bool:
        return self.backend.process_index == 0

    def _init_compat_attributes(self) -> None:
        """transformers' Trainer attributes that scripts and libraries read, with their meaning here."""
        backend = self.backend
        self.model_accepts_loss_kwargs = bool(getattr(backend, "model_accepts_loss_kwargs", False))
        self.can_return_loss = bool(getattr(backend, "can_return_loss", False))
        self.is_fsdp_enabled = bool(getattr(backend, "is_fsdp_enabled", False))
        # DeepSpeed, FSDP on torch_xla's v1 API, model parallelism by device_map and loading sharded by
        # transformers are transformers/accelerate features xtrainer does not run (sharding is the mesh's job).
        self.is_deepspeed_enabled = False
        self.deepspeed = None
        self.is_fsdp_xla_enabled = self.is_fsdp_xla_v1_enabled = self.is_fsdp_xla_v2_enabled = False
        self.is_model_parallel = False
        self.is_distributed_loading_by_transformers = False
        placement = getattr(self.args, "place_model_on_device", None)  # transformers' args hook: None = decide here
        self.place_model_on_device = True if placement is None else bool(placement)
        self.hp_search_backend = None
        self.hp_name = None
        self.neftune_noise_alpha = getattr(self.args, "neftune_noise_alpha", None)
        self.label_smoother = make_label_smoother(self.args.label_smoothing_factor)
        if self.label_smoother is not None and getattr(getattr(self.model, "config", None), "problem_type", None) == (
            "multi_label_classification"
        ):
            warnings.warn("Label smoothing is not compatible with multi-label classification. Disabling label smoothing "
                          "for this training run.", UserWarning, stacklevel=3)
            self.label_smoother = None
        # Evaluation runs the whole eval set on every process, so results need no gathering.
        self.gather_function = _identity
        self.current_gradient_accumulation_steps = self.args.gradient_accumulation_steps
        self.current_flos = 0  # FLOPs counted since the last store_flos (compat/flops.py)
        self.accelerator = AcceleratorView(self)  # what accelerate-based code reads (compat/accelerator.py)
        self.hub_model_id = None  # set by init_hf_repo
        self.push_in_progress = None
        self._train_batch_size = self.args.per_device_train_batch_size
        self._globalstep_last_logged = 0

    def call_model_init(self, trial=None):
        """The model `model_init` builds (with the hyperparameter-search trial when it takes one)."""
        return self._call_model_init(trial)

    def _call_model_init(self, trial=None):
        # inspect.signature (not __code__) also handles bound methods, partials and callable objects.
        params = len(inspect.signature(self.model_init).parameters)
        if params > 1:
            raise RuntimeError("model_init should take 0 or 1 argument (the hyperparameter-search trial).")
        model = self.model_init(trial) if params == 1 else self.model_init()
        if model is None:
            raise RuntimeError("model_init returned None; it must return a model.")
        return model

    def plan(self, tpu_config: str | None = None, **kwargs):
        """Compiles the train step train() would run for a TPU preset, here, and reports memory, FLOPs,
        collectives and shardings per device (xtrainer/planning; needs `pip install 'xtrainer[plan]'`)."""
        from .planning.trainer_plan import plan_for_trainer

        return plan_for_trainer(self, tpu_config, **kwargs)

    def hyperparameter_search(self, hp_space=None, compute_objective=None, n_trials: int = 20, direction="minimize",
                              backend=None, hp_name=None, **kwargs):
        """Optuna search over trainings of model_init's model; returns a BestRun (see hyperparameter_search.py)."""
        from .hyperparameter_search import run_hyperparameter_search

        return run_hyperparameter_search(self, hp_space, compute_objective, n_trials, direction, backend, hp_name, **kwargs)

    # ------------------------------------------------------------------ data

    def _loader(self, dataset: Any, batch_size: int, training: bool, split: str = "train") -> DatasetLoader:
        args = self.args
        workers = options_from_args(args, getattr(self.backend, "pins_host_memory", False), self.backend.name)
        cache = self.__dict__.setdefault("_persistent_loaders", {})
        cached = cache.get((id(dataset), split)) if not training and workers.persistent_workers else None
        if cached is not None and cached[0] is dataset:
            return cached[1]  # evaluation keeps its workers between calls, as in transformers
        per_process = batch_size * self.backend.local_batch_devices
        # Evaluation runs the whole dataset on every process, so no gather is needed afterwards.
        processes = self.backend.num_processes if training else 1
        index = self.backend.process_index if training else 0
        plan = data.BatchPlan(per_process, processes, index, drop_last=args.dataloader_drop_last)
        keep = None
        if args.remove_unused_columns:
            names = self.backend.model_input_names()
            if names is not None:
                keep = names + ["label", "label_ids"] + list(self.label_names)
        order_fn = None
        if training and data.has_length(dataset):
            order_fn = self._train_order_fn(dataset)
        seed = args.data_seed if training and args.data_seed is not None else args.seed
        loader = DatasetLoader(dataset, plan, self.data_collator, order_fn=order_fn, keep_columns=keep,
                               workers=workers, seed=seed, split=split)
        if loader.has_length() and len(loader) == 0:
            raise ValueError(
                f"The dataset has {loader.num_examples} examples, fewer than one batch of {plan.global_batch_size} "
                "with dataloader_drop_last=True: lower the batch size or set dataloader_drop_last=False."
            )
        if not training and workers.persistent_workers:
            cache[(id(dataset), split)] = (dataset, loader)
        return loader

    def _train_order_fn(self, dataset) -> Callable[[int], np.ndarray]:
        args = self.args
        strategy = getattr(args.train_sampling_strategy, "value", args.train_sampling_strategy)
        seed = args.data_seed if args.data_seed is not None else args.seed
        lengths = None
        group = self._train_batch_size * self.backend.local_batch_devices * self.backend.num_processes
        if strategy == "group_by_length":
            lengths = data.example_lengths(dataset, args.length_column_name)
        n = len(dataset)
        return lambda epoch: data.epoch_order(n, strategy, seed, epoch, lengths, group * args.gradient_accumulation_steps)

    def _data_run_info(self, loader) -> dict:
        """What a saved data position means; a resume warns when any of it changed."""
        args = self.args
        return {
            "examples": getattr(loader, "num_examples", None),
            "global_batch_size": self._train_batch_size * self.backend.local_batch_devices * self.backend.num_processes,
            "sampling": _value(args.train_sampling_strategy),
            "data_seed": args.data_seed if args.data_seed is not None else args.seed,
        }

    def get_train_dataloader(self) -> DatasetLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset.")
        # _train_batch_size: args.per_device_train_batch_size, or what auto_find_batch_size found (as in transformers).
        return self._loader(self.train_dataset, self._train_batch_size, training=True)

    def get_eval_dataloader(self, eval_dataset=None) -> DatasetLoader:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Trainer.evaluate() needs an eval_dataset (passed to Trainer or to evaluate).")
        if isinstance(dataset, str):  # the name of one of a dict of eval datasets, as in HF
            if not isinstance(self.eval_dataset, dict) or dataset not in self.eval_dataset:
                raise KeyError(f"No eval dataset named {dataset!r}: the Trainer's eval_dataset must be a dict holding it.")
            dataset = self.eval_dataset[dataset]
        return self._loader(dataset, self.args.per_device_eval_batch_size, training=False, split="eval")

    def get_test_dataloader(self, test_dataset) -> DatasetLoader:
        """The loader predict() runs on; override it to return any iterable of batches (a torch DataLoader too)."""
        if test_dataset is None:
            raise ValueError("Trainer.predict() needs a test_dataset.")
        return self._loader(test_dataset, self.args.per_device_eval_batch_size, training=False, split="test")

    # ------------------------------------------------------------------ training

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None) -> TrainOutput:
        """Trains the model; returns TrainOutput(global_step, training_loss, metrics).

        Args:
            resume_from_checkpoint: True for the newest checkpoint in output_dir, or a checkpoint path.
        """
        args = self.args
        if resume_from_checkpoint is None and args.resume_from_checkpoint:
            resume_from_checkpoint = args.resume_from_checkpoint
        check_output_dir(args.output_dir)
        resume_dir = ckpt.resolve_resume_checkpoint(resume_from_checkpoint, args.output_dir)
        if self.model_init is not None:
            set_seed(args.seed, deterministic=args.full_determinism)
            self.model = self.backend.prepare(self.call_model_init(trial), args, hooks=self.hooks)
            self.model_wrapped = self.model
            # A new model needs a new optimizer and schedule (transformers resets both too).
            self.optimizer, self.lr_scheduler = None, None
            self.callback_handler.model = self.model
        self.is_in_train = True
        self._memory_tracker.start("train")
        try:
            # With enable_jit_checkpoint, SIGTERM saves the step and exits 143; a dead peer process gives a
            # clear error; an asynchronous save in flight is settled (preemption.py).
            with preemption.guard_train(self) as self._preemption:
                # auto_find_batch_size: out of memory restarts the loop with a smaller batch (auto_batch.py).
                return train_with_batch_search(
                    self, lambda: self._train_loop(resume_dir, trial, ignore_keys_for_eval), resume_dir)
        finally:
            self.is_in_train, self._preemption = False, None
            getattr(getattr(self, "_train_loader", None), "close", lambda: None)()  # persistent workers

    def get_total_train_batch_size(self, args) -> int:
        """Examples per optimizer step over every process: per-device batch x batch devices x accumulation."""
        devices = self.backend.local_batch_devices * self.backend.num_processes
        return self._train_batch_size * devices * args.gradient_accumulation_steps

    def set_initial_training_values(self, args, dataloader) -> tuple:
        """transformers' step arithmetic for one train() call.

        Returns:
            (num_train_epochs, num_update_steps_per_epoch, num_examples, num_train_samples,
             total_train_batch_size, steps_in_epoch, max_steps)
        """
        ga = args.gradient_accumulation_steps
        total_train_batch_size = self.get_total_train_batch_size(args)
        if _loader_has_length(dataloader):
            batches = len(dataloader)
            per_epoch = max(batches // ga + int(batches % ga > 0), 1)
            num_examples = self.num_examples(dataloader)
            if args.max_steps > 0:
                max_steps = args.max_steps
                epochs = max_steps // per_epoch + int(max_steps % per_epoch > 0)
                num_train_samples = max_steps * total_train_batch_size
            else:
                max_steps = math.ceil(args.num_train_epochs * per_epoch)
                epochs = math.ceil(args.num_train_epochs)
                num_train_samples = num_examples * args.num_train_epochs
            return epochs, per_epoch, num_examples, num_train_samples, total_train_batch_size, batches, max_steps
        if args.max_steps <= 0:
            raise ValueError("The train_dataset has no length (a stream): set max_steps to a positive number.")
        max_steps = args.max_steps
        num_train_samples = max_steps * total_train_batch_size
        return sys.maxsize, max_steps, num_train_samples, num_train_samples, total_train_batch_size, max_steps * ga, max_steps

    def num_examples(self, dataloader) -> int:
        """Examples in a loader's dataset (transformers' rule: the dataset's length, else batches x batch size)."""
        count = getattr(dataloader, "num_examples", None)
        if isinstance(count, int):
            return count
        dataset = getattr(dataloader, "dataset", None)
        if dataset is not None and data.has_length(dataset):
            return len(dataset)
        return len(dataloader) * self._train_batch_size

    def _train_loop(self, resume_dir, trial, ignore_keys_for_eval) -> TrainOutput:
        args, backend = self.args, self.backend
        loader = self._train_loader = as_loader(self.get_train_dataloader(), "train")
        self._data_position = None
        (num_epochs, updates_per_epoch, num_examples, num_train_samples, total_batch_size, batches_per_epoch,
         max_steps) = self.set_initial_training_values(args, loader)
        exportable = self.callback_handler.callbacks + [self.control]
        self.state = TrainerState(stateful_callbacks=[cb for cb in exportable if hasattr(cb, "state")])
        self.state.is_hyper_param_search = trial is not None
        self.state.train_batch_size = self._train_batch_size * backend.local_batch_devices
        self.state.compute_steps(args, max_steps)
        self._prepare_optimizer_and_state(max_steps)
        epochs_done, skip_batches = 0, 0
        if resume_dir is not None:
            self.state = TrainerState.load_from_json(os.path.join(resume_dir, ckpt.TRAINER_STATE_NAME))
            if self.state.best_model_checkpoint and not os.path.isdir(self.state.best_model_checkpoint):
                self.state.best_model_checkpoint = None
            warn_on_mismatched_arguments(args, self.state, backend.local_batch_devices)
            self._load_callback_state()
            self._resume_backend_state(resume_dir)
            epochs_done = self.state.global_step // updates_per_epoch
            if not args.ignore_data_skip:
                skip_batches = (self.state.global_step % updates_per_epoch) * args.gradient_accumulation_steps
                epochs_done, skip_batches = data_state.resume_position(  # the saved position, when there is one
                    resume_dir, loader, backend.process_index, self._data_run_info(loader), (epochs_done, skip_batches))
        self.state.init_training_references(self, max_steps, num_epochs, trial)
        self._sync_handler_refs(loader)
        counts_items, shifts = backend.counts_label_items()
        self._count_items, self._shift_labels = counts_items, shifts
        self._losses = LossTracker(args.logging_nan_inf_filter)
        self._nan = NanMonitor(args.nan_policy, self.state.global_step, lambda: backend.finalize(self._backend_state))
        self._globalstep_last_logged = self.state.global_step
        initial_step = self.state.global_step
        self._tokens_at_start = self.state.num_input_tokens_seen
        self._throughput = ThroughputMeter(backend)  # tokens_per_second and mfu in the logs
        start_time = time.time()
        log_training_banner(self, num_examples, num_epochs, updates_per_epoch, total_batch_size, max_steps,
                            epochs_done if resume_dir is not None else None, skip_batches)

        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        if args.eval_on_start:
            with self._throughput.paused():
                self._evaluate(trial, ignore_keys_for_eval, skip_scheduler=True)
        for epoch in range(epochs_done, num_epochs):
            if self.state.global_step >= max_steps:  # resumed from the final checkpoint: no step is left
                break
            self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
            start = skip_batches if epoch == epochs_done else 0
            self._run_epoch(loader, epoch, start, batches_per_epoch, updates_per_epoch, trial, ignore_keys_for_eval, start_time)
            if self.control.should_training_stop:
                break
        preemption.at_loop_end(self)  # a SIGTERM in the last step; an asynchronous save still in flight
        return self._finish_training(initial_step, max_steps, num_train_samples, start_time, trial)

    def _prepare_optimizer_and_state(self, max_steps: int) -> None:
        """Wraps the model for training, builds the optimizer and schedule through the (overridable)
        create_* hooks, as transformers does, and hands them to the backend."""
        if self._created_lr_scheduler:  # a schedule built for an earlier train() call; the step count may differ
            self.lr_scheduler, self._created_lr_scheduler = None, False
        # Wrapping first: FSDP2 shards the model's parameters in place, and the optimizer must hold the shards.
        self.model_wrapped = self.backend.wrap_for_training()
        self.create_optimizer_and_scheduler(num_training_steps=max_steps)
        self._backend_state = self.backend.init_state(max_steps, self.optimizer, self.lr_scheduler)

    def _resume_backend_state(self, resume_dir: str) -> None:
        """Restores the backend's state from a checkpoint, the model weights through `_load_from_checkpoint`."""
        backend = self.backend
        if backend.weights_restored_with_state:
            # One file holds weights and optimizer state together (JAX's orbax checkpoint): restore it whole; a
            # user's _load_from_checkpoint then runs on top, and the backend takes the weights it loaded.
            self._backend_state = backend.restore(self._backend_state, resume_dir, include_model=True)
            if self.hooks.overrides("_load_from_checkpoint"):
                self._load_from_checkpoint(resume_dir)
                self._backend_state = backend.adopt_model_weights(self._backend_state)
            return
        self._load_from_checkpoint(resume_dir)
        self._backend_state = backend.restore(self._backend_state, resume_dir, include_model=False)

    def _load_callback_state(self) -> None:
        """Restores the stateful callbacks (and the control) saved in the checkpoint's trainer state, when
        args.restore_callback_states_from_checkpoint is set (transformers' default: they start afresh)."""
        if not self.args.restore_callback_states_from_checkpoint:
            return
        self.control = restore_callback_states(self.state, self.callback_handler, self.control)

    def _get_output_dir(self, trial=None) -> str:
        """Where checkpoints go: output_dir, or its `run-<trial number>` folder during a hyperparameter search."""
        if trial is None or not self.hp_search_backend:
            return self.args.output_dir
        number = getattr(trial, "number", None)
        run_name = self.hp_name(trial) if self.hp_name is not None else f"run-{number}"
        return os.path.join(self.args.output_dir, run_name)

    def _sync_handler_refs(self, loader) -> None:
        handler = self.callback_handler
        handler.model = self.model
        handler.train_dataloader = getattr(loader, "loader", loader)  # a user's own loader is shown as itself
        handler.optimizer, handler.lr_scheduler = self.optimizer, self.lr_scheduler

    def get_batch_samples(self, epoch_iterator, num_batches: int, device) -> tuple[list, int | None]:
        """The next `num_batches` host batches of the epoch and their label-token count (num_items_in_batch).

        The count is taken when the loss is normalised by it (the model takes num_items_in_batch, or a
        compute_loss_func is given), summed over processes with average_tokens_across_devices, as in
        transformers. Batches here are the host pipeline's numpy batches (`device` is accepted for
        transformers' signature; placement happens after). The loop places one window ahead of the step
        that runs, so the window after the last step may be asked for too.
        """
        batch_samples = list(itertools.islice(epoch_iterator, num_batches))
        if self.backend.looks_up_token_ids:
            for batch in batch_samples:
                data.check_token_ids(batch)
        if not batch_samples or not self._count_items:
            return batch_samples, None
        num_items = data.count_label_items(batch_samples, self._shift_labels)
        if num_items is not None and self.args.average_tokens_across_devices:
            num_items = self.backend.all_sum(num_items)
        return batch_samples, num_items

    def _windows(self, batches, first_update, updates_per_epoch, remainder):
        """Accumulation windows of one epoch: (host batches, label-token count), HF's chunking.

        Every window has gradient_accumulation_steps micro-batches except the epoch's last, which
        takes the remainder.
        """
        ga = self.args.gradient_accumulation_steps
        for update in range(first_update, updates_per_epoch):
            window, num_items = self.get_batch_samples(batches, ga if update != updates_per_epoch - 1 else remainder, None)
            if not window:
                return
            yield window, num_items

    def _run_epoch(self, loader, epoch, start_batch, batches_per_epoch, updates_per_epoch, trial, ignore_keys, start_time):
        args, backend = self.args, self.backend
        ga = args.gradient_accumulation_steps
        remainder = batches_per_epoch % ga or ga
        windows = self._windows(loader.epoch(epoch, start_batch), start_batch // ga, updates_per_epoch, remainder)
        step = start_batch - 1  # index of the last micro-batch consumed in this epoch
        grad_norm = learning_rate = None
        events = StepEvents(self)
        for window, num_items, device_window in prefetch_to_device(windows, backend.shard_window):
            self._track_tokens(window)
            self._throughput.add(window)
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            self.current_gradient_accumulation_steps = len(window)
            self._backend_state, metrics = backend.train_step(self._backend_state, device_window, num_items, events)
            step += len(window)
            self._data_position = (epoch, step + 1)  # micro-batches of this epoch trained on (data_state.py)
            grad_norm, learning_rate = metrics.grad_norm, metrics.learning_rate
            self._losses.add(metrics.loss, self.state.global_step - self._globalstep_last_logged)
            self.current_flos += sum(float(self.floating_point_ops(batch)) for batch in window)
            self._nan.observe(metrics)
            self.state.global_step += 1
            self.state.epoch = epoch + (step + 1) / batches_per_epoch
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            self._maybe_log_save_evaluate(self._losses, grad_norm, self.model_wrapped, trial, epoch, ignore_keys,
                                          start_time, learning_rate=learning_rate)
            preemption.stop_if_preempted(self)
            if self.control.should_epoch_stop or self.control.should_training_stop:
                break
        if step < 0:
            logger.warning("The training data yielded no batch in this epoch; stopping at step %s.", self.state.global_step)
            self.control.should_training_stop = True
        self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
        self._maybe_log_save_evaluate(self._losses, grad_norm, self.model_wrapped, trial, epoch, ignore_keys,
                                      start_time, learning_rate=learning_rate)

    def _track_tokens(self, window) -> None:
        mode = self.args.include_num_input_tokens_seen
        if mode in (False, None, "no"):
            return
        for batch in window:
            if mode == "non_padding" and "attention_mask" in batch:
                self.state.num_input_tokens_seen += int(np.asarray(batch["attention_mask"]).sum())
            elif "input_ids" in batch:
                self.state.num_input_tokens_seen += int(np.asarray(batch["input_ids"]).size)

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                 learning_rate=None) -> None:
        """Logs, evaluates and saves when the callbacks' control flags say so (transformers' signature).

        `tr_loss` holds the step losses since the last log, still on the device (a LossTracker); it is
        read, and reset, only here.
        """
        if self.control.should_log and self.state.global_step > self._globalstep_last_logged:
            logs: dict[str, float] = {}
            loss_sum = tr_loss.drain(self.backend.to_host)
            logs["loss"] = loss_sum / (self.state.global_step - self._globalstep_last_logged)
            if grad_norm is not None:
                logs["grad_norm"] = float(self.backend.to_host(grad_norm))
            if learning_rate is not None:
                logs["learning_rate"] = learning_rate
            self._globalstep_last_logged = self.state.global_step
            self.store_flos()
            logs.update(self._throughput.report())
            self._nan.report(logs, self.backend.to_host)  # nan_policy: may raise, or log nan_skipped_steps
            self.log(logs, start_time)
        if self.control.should_evaluate:
            with self._throughput.paused():
                eval_metrics = self._evaluate(trial, ignore_keys_for_eval)
            is_new_best = self._determine_best_metric(eval_metrics)
            if _value(self.args.save_strategy) == SaveStrategy.BEST.value:
                self.control.should_save = is_new_best
        if self.control.should_save:
            with self._throughput.paused():
                self._save_checkpoint(model, trial)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def _finish_training(self, initial_step, max_steps, num_train_samples, start_time, trial) -> TrainOutput:
        args = self.args
        self._losses.drain(self.backend.to_host)
        self._nan.report(None, self.backend.to_host)
        steps_run = self.state.global_step - initial_step
        train_loss = self._losses.total / max(steps_run, 0.001)
        # num_train_samples covers the whole schedule: only count the share of the steps run in this call.
        samples = num_train_samples * steps_run / max(max_steps, 1)
        metrics = speed_metrics("train", start_time, num_samples=samples, num_steps=steps_run)
        self.store_flos()
        metrics["total_flos"] = self.state.total_flos
        metrics["train_loss"] = train_loss
        self._memory_tracker.stop_and_update_metrics("train", metrics)
        self.log(metrics)
        if args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            logger.info("Loading best model from %s (score: %s).", self.state.best_model_checkpoint, self.state.best_metric)
            ckpt.verify_for_load(self.state.best_model_checkpoint)
            self.backend.load_model_weights(self._backend_state, self.state.best_model_checkpoint)
        if self.is_world_process_zero() and self.state.best_model_checkpoint and args.save_total_limit == 1:
            # With a limit of 1, only the best checkpoint survives the end of training (as in HF).
            for path in sorted_checkpoints(args.output_dir):
                if os.path.normpath(path) != os.path.normpath(self.state.best_model_checkpoint):
                    shutil.rmtree(path, ignore_errors=True)
        self.model = self.backend.finalize(self._backend_state)
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        hub.finish_current_push(self)  # checkpoint uploads still in flight
        return TrainOutput(self.state.global_step, train_loss, metrics)

    # ------------------------------------------------------------------ overridable hooks (transformers' names)

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        """Builds the optimizer, then the learning-rate schedule (override either, or both)."""
        self.create_optimizer()
        self.create_scheduler(num_training_steps=num_training_steps, optimizer=self.optimizer)

    def create_optimizer(self, model=None):
        """The optimizer: the one passed in `optimizers`, else the backend's default for `args.optim`.

        torch backends: a torch.optim.Optimizer over transformers' decay / no-decay parameter groups.
        jax: an optax GradientTransformation (a subclass may return its own; see README).
        """
        opt_model = self.backend.optimizer_target() if model is None else model
        if self.optimizer is None:
            self.optimizer = self.backend.create_optimizer(opt_model)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The learning-rate schedule for `num_training_steps` (`args.lr_scheduler_type`), unless one was passed.

        torch backends: a torch LRScheduler over the optimizer. jax: a callable step -> learning rate.
        """
        if self.lr_scheduler is None:
            self.lr_scheduler = self.backend.create_scheduler(num_training_steps, optimizer if optimizer is not None else self.optimizer)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None) -> tuple[Any, Any]:
        """The torch optimizer class and its kwargs for `args.optim` (transformers' static method)."""
        from .backends.torch.optim import get_optimizer_cls_and_kwargs

        return get_optimizer_cls_and_kwargs(args, model)

    def get_decay_parameter_names(self, model) -> list[str]:
        """Names of the parameters weight decay applies to: not biases, not normalisation weights."""
        return self.backend.decay_parameter_names(model)

    def get_learning_rates(self) -> list[float]:
        """The learning rate of each optimizer parameter group (one value on jax)."""
        if self.optimizer is None:
            raise ValueError("Trainer optimizer is None, please make sure you have setup the optimizer before.")
        return self.backend.learning_rates(self.optimizer)

    def get_optimizer_group(self, param=None):
        """The optimizer group that holds `param`, or every group's parameters when `param` is None."""
        if self.optimizer is None:
            raise ValueError("Trainer optimizer is None, please make sure you have setup the optimizer before.")
        return self.backend.optimizer_group(self.optimizer, param)

    def training_step(self, model, inputs: dict[str, Any], num_items_in_batch=None):
        """Forward and backward of one micro-batch; returns its (detached) loss.

        Called once per micro-batch by the torch and torch_xla backends, exactly where transformers calls
        it. The jax backend compiles the whole step and refuses a subclass that overrides this hook.
        """
        return self.backend.training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        """The loss of one batch (and the model outputs with return_outputs=True).

        Default: the model's own loss, `compute_loss_func`, or label smoothing. On jax this runs inside the
        compiled step: `model` is the model bound to the step's parameters and `inputs` are jax arrays
        (torch tensors, through torchax, for a torch model), so an override is traced with the step.
        """
        return self.backend.compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def compute_loss_context_manager(self):
        """The context the loss is computed in (autocast for mixed precision)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.autocast_smart_context_manager())
        return stack

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        """torch.autocast for bf16 / fp16 runs on the torch backends, else a null context."""
        return self.backend.autocast_context(cache_enabled)

    def _prepare_input(self, data: Any) -> Any:
        """One input (tensor, or nested dicts / lists of them) moved where the model runs."""
        return self.backend.prepare_inputs(data)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch, ready for the model (on its device)."""
        inputs = self._prepare_input(inputs)
        if len(inputs) == 0:
            raise ValueError(
                "The batch received was empty, so the model cannot train on it: check that the training dataset "
                "has the columns the model's forward takes."
            )
        return inputs

    def prediction_step(self, model, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys=None):
        """(loss, logits, labels) for one evaluation batch; each may be None."""
        return self.backend.prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    # ------------------------------------------------------------------ reports and counters (compat/)

    @staticmethod
    def metrics_format(metrics: dict[str, float]) -> dict[str, float]:
        """Metrics made readable for log_metrics (memory in MB, runtimes as clock time, FLOPs in GF)."""
        return metrics_report.metrics_format(metrics)

    def log_metrics(self, split: str, metrics: dict) -> None:
        """Prints a `***** {split} metrics *****` table (main process)."""
        metrics_report.log_metrics(self, split, metrics)

    def save_metrics(self, split: str, metrics: dict, combined: bool = True) -> None:
        """Writes {split}_results.json (and merges all_results.json) into output_dir (main process)."""
        metrics_report.save_metrics(self, split, metrics, combined)

    def get_num_trainable_parameters(self) -> int:
        return self.backend.num_trainable_parameters()

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """FLOPs of forward + backward on one micro-batch (6 x tokens x parameters; 0 when the model cannot
        count its parameters). Override for other models."""
        return flops.floating_point_ops(self.model, inputs)

    def store_flos(self) -> None:
        """Adds the FLOPs counted since the last call to state.total_flos (summed over processes)."""
        flops.store_flos(self)

    def get_sp_size(self) -> int:
        """Sequence-parallel degree: 1 (xtrainer's mesh has data, fsdp and tensor axes)."""
        return 1

    def get_cp_size(self) -> int:
        """Context-parallel degree: 1 (xtrainer's mesh has data, fsdp and tensor axes)."""
        return 1

    def get_tp_size(self) -> int:
        """Tensor-parallel degree: the model's `_tp_size` (transformers' tensor-parallel loading records it), else
        the mesh's tensor axis (jax, torch_xla), else 1."""
        model_tp = getattr(self.model, "_tp_size", None)
        if model_tp is not None:
            return int(model_tp)
        return int(getattr(getattr(self.backend, "mesh_config", None), "tensor", 1) or 1)

    def create_accelerator_and_postprocess(self) -> None:
        """transformers builds its accelerate Accelerator here; xtrainer has none (trainer.accelerator answers
        what accelerate-based code reads), so there is nothing to create."""
        raise NotImplementedError(
            "create_accelerator_and_postprocess: xtrainer does not run accelerate; its backend is chosen and prepared "
            "in Trainer.__init__ (see trainer.backend and trainer.accelerator)."
        )

    # ------------------------------------------------------------------ the Hub (compat/hub.py)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Creates (or reuses) the Hub repository args.hub_model_id (default: output_dir's name)."""
        hub.init_hf_repo(self, token=token, private=private)

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None) -> None:
        """Writes output_dir/README.md with the run's hyperparameters and results."""
        hub.create_model_card(self, language=language, license=license, tags=tags, model_name=model_name,
                              finetuned_from=finetuned_from, tasks=tasks, dataset_tags=dataset_tags, dataset=dataset,
                              dataset_args=dataset_args)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """Saves the model and its card and uploads output_dir to the Hub repository."""
        return hub.push_to_hub(self, commit_message=commit_message, blocking=blocking, token=token, revision=revision,
                               private=private, **kwargs)

    def end(self) -> None:
        """Ends the run's process group, as transformers' end() does (call once, at the end of a script)."""
        ending = getattr(self.backend, "end", None)
        if callable(ending):
            ending()

    # ------------------------------------------------------------------ logging, best model, checkpoints

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Appends logs (plus epoch and step) to log_history and calls on_log."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        if self.args.include_num_input_tokens_seen not in (False, None, "no"):
            logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
            if start_time is not None:
                seen = self.state.num_input_tokens_seen - getattr(self, "_tokens_at_start", 0)
                logs.update(speed_metrics("train", start_time, num_tokens=seen))
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    def _metric_key(self) -> str:
        key = self.args.metric_for_best_model
        return key if key.startswith("eval_") else f"eval_{key}"

    def _determine_best_metric(self, metrics: dict) -> bool:
        if self.args.metric_for_best_model is None:
            return False
        key = self._metric_key()
        if key not in metrics:
            raise KeyError(
                f"metric_for_best_model={self.args.metric_for_best_model!r} is not among the evaluation metrics "
                f"{sorted(metrics)}; set metric_for_best_model to one of them."
            )
        value = metrics[key]
        better = np.greater if self.args.greater_is_better else np.less
        if self.state.best_metric is None:
            self.state.best_metric = float("-inf") if self.args.greater_is_better else float("inf")
        if better(value, self.state.best_metric):
            self.state.best_metric = value
            if _value(self.args.save_strategy) != SaveStrategy.NO.value:
                self.state.best_global_step = self.state.global_step
            return True
        return False

    def _save_checkpoint(self, model=None, trial=None) -> None:
        """Writes checkpoint-{global_step}/ on every process, published only when complete everywhere (or, with
        async_checkpointing, finished in the background), then rotates old checkpoints."""
        args, backend = self.args, self.backend
        run_dir = args.output_dir
        step = self._last_saved_step = self.state.global_step
        self.store_flos()  # total_flos in the checkpoint's trainer_state.json is up to date
        if self.state.best_global_step:
            best = os.path.join(run_dir, ckpt.checkpoint_dir_name(self.state.best_global_step))
            if self.state.best_global_step == step or os.path.isdir(best):
                self.state.best_model_checkpoint = best

        def write_front_files(tmp: str) -> None:  # the main process, into the unpublished directory
            self.state.update_stateful_callbacks(self.callback_handler.callbacks + [self.control])
            self.state.save_to_json(os.path.join(tmp, ckpt.TRAINER_STATE_NAME))
            ckpt.save_training_args(args, tmp)

        writer = checkpoint_writer.writer_for(self)
        write_model_files, in_background = None, False
        pushes_model = args.push_to_hub and hub.HubStrategy(args.hub_strategy) != hub.HubStrategy.END
        if backend.model_files_in_checkpoints or self.hooks.overrides("_save") or pushes_model:
            # The model files go through the overridable _save, as in transformers. The weights are gathered now
            # (collective under FSDP); a save that finishes in the background gets a host copy and writes later.
            in_background = writer.asynchronous and not backend.weights_restored_with_state
            state_dict = backend.model_state_for_save(self._backend_state, copy=in_background)
            if self.args.should_save:
                def write_model_files(tmp: str) -> None:
                    self._save(tmp, state_dict=state_dict)

        best_now = self.state.best_model_checkpoint

        def after_publish() -> None:  # the main process, once checkpoint-N/ is complete
            if args.push_to_hub:
                hub.push_from_checkpoint(self, os.path.join(run_dir, ckpt.checkpoint_dir_name(step)))
            ckpt.rotate_checkpoints(run_dir, args.save_total_limit, best_now)

        # Every process's part, the agreement on the outcome, atomic publication (checkpoint_writer.py).
        writer.save(
            step, self._backend_state, save_only_model=args.save_only_model, write_front_files=write_front_files,
            write_model_files=write_model_files, model_files_in_background=in_background, after_publish=after_publish,
            write_process_files=lambda tmp: data_state.save(tmp, self._train_loader, self._data_position,
                                                            backend.process_index, self._data_run_info(self._train_loader)),
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Writes the model where its own library loads it from (e.g. from_pretrained), plus training_args.bin.

        Every process calls it (gathering sharded weights is collective); the main process writes, through
        `_save`.
        """
        output_dir = output_dir or self.args.output_dir
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise NotADirectoryError(f"Cannot save the model to {output_dir!r}: it exists and is a file.")
        state_dict = self.backend.model_state_for_save(self._backend_state)
        if self.args.should_save:  # the main process (of each node with save_on_each_node)
            self._save(output_dir, state_dict=state_dict)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Writes the model files, the processing class and training_args.bin into output_dir (main process)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.backend.export_model(self._backend_state, output_dir, state_dict=state_dict)
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(output_dir)
        ckpt.save_training_args(self.args, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Loads the model weights of a checkpoint (the optimizer, schedule and RNG state follow separately)."""
        self.backend.load_model_weights(self._backend_state, resume_from_checkpoint)

    def save_state(self) -> None:
        """Writes trainer_state.json into output_dir."""
        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            self.state.save_to_json(os.path.join(self.args.output_dir, ckpt.TRAINER_STATE_NAME))

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, trial, ignore_keys, skip_scheduler: bool = False) -> dict:
        metrics = self.evaluate(ignore_keys=ignore_keys)
        if not skip_scheduler and self._backend_state is not None and self.args.metric_for_best_model:
            key = self._metric_key()
            if key in metrics:
                self.backend.on_eval_metric(self._backend_state, metrics[key])
            elif scheduler_needs_metric(self.args, self.lr_scheduler):
                raise KeyError(f"The metric-driven lr scheduler follows metric_for_best_model={key!r}, which is not "
                               f"among the evaluation metrics {sorted(metrics)}; return it from compute_metrics or "
                               "change metric_for_best_model.")
        return metrics

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Runs evaluation; returns metrics prefixed with metric_key_prefix (eval_loss, eval_<metric>, ...)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):
            metrics = {}
            for name, part in dataset.items():
                metrics.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        self._memory_tracker.start("evaluate")
        loader = self.get_eval_dataloader(dataset)
        start = time.time()
        output = self.evaluation_loop(
            loader, "Evaluation", prediction_loss_only=True if self.compute_metrics is None else None,
            ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix,
        )
        total_batch = self.args.per_device_eval_batch_size * self.backend.local_batch_devices
        output.metrics.update(
            speed_metrics(metric_key_prefix, start, num_samples=output.num_samples,
                          num_steps=math.ceil(output.num_samples / total_batch))
        )
        self.log(output.metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=output.metrics)
        self._memory_tracker.stop_and_update_metrics("evaluate", output.metrics)
        return output.metrics

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test") -> PredictionOutput:
        """Runs prediction; returns PredictionOutput(predictions, label_ids, metrics)."""
        self._memory_tracker.start("predict")
        loader = self.get_test_dataloader(test_dataset)
        start = time.time()
        output = self.evaluation_loop(loader, "Prediction", ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        total_batch = self.args.per_device_eval_batch_size * self.backend.local_batch_devices
        output.metrics.update(
            speed_metrics(metric_key_prefix, start, num_samples=output.num_samples,
                          num_steps=math.ceil(output.num_samples / total_batch))
        )
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, metrics=output.metrics)
        self._memory_tracker.stop_and_update_metrics("predict", output.metrics)
        return PredictionOutput(output.predictions, output.label_ids, output.metrics)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval") -> EvalLoopOutput:
        """The loop shared by evaluate() and predict(): batches -> eval_step -> host arrays -> metrics."""
        from .evaluation import run_evaluation

        return run_evaluation(self, dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)


def _apply_use_cache(model, use_cache: bool) -> None:
    """args.use_cache onto the model's config, as transformers' Trainer does (off for training by default)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = use_cache


def _loader_has_length(loader) -> bool:
    known = getattr(loader, "has_length", None)
    if callable(known):
        return bool(known())
    try:
        len(loader)
    except (TypeError, NotImplementedError):
        return False
    return True


def _identity(value):
    return value


def make_label_smoother(epsilon: float):
    """transformers' `label_smoother` attribute: a LabelSmoother when label_smoothing_factor is set, else None."""
    if not epsilon:
        return None
    from .label_smoothing import LabelSmoother

    return LabelSmoother(epsilon=epsilon)


def _value(enum_or_str) -> str:
    return getattr(enum_or_str, "value", enum_or_str)


def _default_collator(processing_class):
    """HF's choice: pad with the tokenizer when one is given, else stack the examples."""
    if processing_class is not None and hasattr(processing_class, "pad"):
        try:
            from transformers import DataCollatorWithPadding
        except ImportError:
            return data.default_data_collator
        return DataCollatorWithPadding(processing_class)
    return data.default_data_collator


__all__ = ["Trainer", "EvalPrediction", "speed_metrics"]
