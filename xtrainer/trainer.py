"""The Trainer front: the one training loop, evaluation, prediction, checkpoints and best-model tracking.

It owns no device code. Everything that touches a device goes through the Backend chosen once in
`__init__` (see backends/base.py). Batches come from the backend-neutral host pipeline (data.py,
loaders.py) as numpy arrays. Device metrics are read back only when a log is written, so the hot
loop never waits on the device.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import checkpoint as ckpt
from .args_checks import check_eval_dataset, check_output_dir
from .auto_batch import train_with_batch_search
from . import data, preemption
from .backends import get_backend, resolve_backend_name
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
from .loaders import DatasetLoader
from .integrations import reporting_callbacks
from .loop_support import LossTracker, StepEvents, prefetch_one, speed_metrics
from .nan_policy import NanMonitor
from .throughput import ThroughputMeter
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
        preprocess_logits_for_metrics: Callable | None = None,
        **deprecated,
    ):
        if "tokenizer" in deprecated:
            processing_class = processing_class or deprecated.pop("tokenizer")
        if deprecated:
            raise TypeError(f"Trainer got unexpected keyword arguments: {sorted(deprecated)}")
        self.args = args if args is not None else TrainingArguments(output_dir="trainer_output")
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
        check_eval_dataset(self.args, eval_dataset)
        self.backend = get_backend(resolve_backend_name(self.args.backend, model))
        self.compute_loss_func = compute_loss_func
        self.model = self.backend.prepare(model, self.args, compute_loss_func=compute_loss_func)
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.processing_class = processing_class
        self.data_collator = data_collator or _default_collator(processing_class)
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.optimizers = optimizers
        self.optimizer, self.lr_scheduler = optimizers
        self.label_names = self.args.label_names or self.backend.default_label_names()
        self._backend_state = None
        # Same order as transformers: flow control, report_to integrations, the user's callbacks, then progress.
        progress = PrinterCallback if self.args.disable_tqdm else ProgressCallback
        reporters = reporting_callbacks(self.args.report_to, self.is_world_process_zero())
        self.callback_handler = CallbackHandler(
            [DefaultFlowCallback, *reporters, *(callbacks or []), progress], self.model, processing_class, *optimizers
        )
        self.state = TrainerState(
            is_local_process_zero=self.is_local_process_zero(), is_world_process_zero=self.is_world_process_zero()
        )
        self.control = TrainerControl()
        self.is_in_train = False
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)

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

    def _loader(self, dataset: Any, batch_size: int, training: bool) -> DatasetLoader:
        args = self.args
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
        loader = DatasetLoader(dataset, plan, self.data_collator, order_fn=order_fn, keep_columns=keep)
        if loader.has_length() and len(loader) == 0:
            raise ValueError(
                f"The dataset has {loader.num_examples} examples, fewer than one batch of {plan.global_batch_size} "
                "with dataloader_drop_last=True: lower the batch size or set dataloader_drop_last=False."
            )
        return loader

    def _train_order_fn(self, dataset) -> Callable[[int], np.ndarray]:
        args = self.args
        strategy = getattr(args.train_sampling_strategy, "value", args.train_sampling_strategy)
        seed = args.data_seed if args.data_seed is not None else args.seed
        lengths = None
        group = args.per_device_train_batch_size * self.backend.local_batch_devices * self.backend.num_processes
        if strategy == "group_by_length":
            lengths = data.example_lengths(dataset, args.length_column_name)
        n = len(dataset)
        return lambda epoch: data.epoch_order(n, strategy, seed, epoch, lengths, group * args.gradient_accumulation_steps)

    def get_train_dataloader(self) -> DatasetLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset.")
        return self._loader(self.train_dataset, self.args.per_device_train_batch_size, training=True)

    def get_eval_dataloader(self, eval_dataset=None) -> DatasetLoader:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Trainer.evaluate() needs an eval_dataset (passed to Trainer or to evaluate).")
        if isinstance(dataset, str):  # the name of one of a dict of eval datasets, as in HF
            if not isinstance(self.eval_dataset, dict) or dataset not in self.eval_dataset:
                raise KeyError(f"No eval dataset named {dataset!r}: the Trainer's eval_dataset must be a dict holding it.")
            dataset = self.eval_dataset[dataset]
        return self._loader(dataset, self.args.per_device_eval_batch_size, training=False)

    # ------------------------------------------------------------------ training

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs) -> TrainOutput:
        """Trains the model; returns TrainOutput(global_step, training_loss, metrics).

        Args:
            resume_from_checkpoint: True for the newest checkpoint in output_dir, or a checkpoint path.
        """
        if kwargs:
            raise TypeError(f"train() got unexpected keyword arguments: {sorted(kwargs)}")
        args = self.args
        if resume_from_checkpoint is None and args.resume_from_checkpoint:
            resume_from_checkpoint = args.resume_from_checkpoint
        check_output_dir(args.output_dir)
        resume_dir = ckpt.resolve_resume_checkpoint(resume_from_checkpoint, args.output_dir)
        if self.model_init is not None:
            set_seed(args.seed, deterministic=args.full_determinism)
            self.model = self.backend.prepare(self._call_model_init(trial), args, compute_loss_func=self.compute_loss_func)
            self.callback_handler.model = self.model
        self.is_in_train = True
        try:
            with preemption.watch_sigterm(self.backend) as self._preemption:  # SIGTERM: save, then exit 143
                # auto_find_batch_size: out of memory restarts the loop with a smaller batch (auto_batch.py).
                return train_with_batch_search(
                    self, lambda: self._train_loop(resume_dir, trial, ignore_keys_for_eval), resume_dir)
        finally:
            self.is_in_train, self._preemption = False, None

    def _plan_steps(self, loader: DatasetLoader):
        """HF's step arithmetic: (epochs, update steps per epoch, micro-batches per epoch, max_steps)."""
        args = self.args
        ga = args.gradient_accumulation_steps
        if loader.has_length():
            batches = len(loader)
            per_epoch = max(batches // ga + int(batches % ga > 0), 1)
            if args.max_steps > 0:
                max_steps = args.max_steps
                epochs = max_steps // per_epoch + int(max_steps % per_epoch > 0)
            else:
                max_steps = math.ceil(args.num_train_epochs * per_epoch)
                epochs = math.ceil(args.num_train_epochs)
            return epochs, per_epoch, batches, max_steps
        if args.max_steps <= 0:
            raise ValueError("The train_dataset has no length (a stream): set max_steps to a positive number.")
        return sys.maxsize, args.max_steps, args.max_steps * ga, args.max_steps

    def _train_loop(self, resume_dir, trial, ignore_keys_for_eval) -> TrainOutput:
        args, backend = self.args, self.backend
        loader = self.get_train_dataloader()
        num_epochs, updates_per_epoch, batches_per_epoch, max_steps = self._plan_steps(loader)
        exportable = self.callback_handler.callbacks + [self.control]
        self.state = TrainerState(stateful_callbacks=[cb for cb in exportable if hasattr(cb, "state")])
        self.state.is_hyper_param_search = trial is not None
        self.state.train_batch_size = args.per_device_train_batch_size * backend.local_batch_devices
        self.state.compute_steps(args, max_steps)
        self._backend_state = backend.init_state(max_steps, self.optimizers)
        epochs_done, skip_batches = 0, 0
        if resume_dir is not None:
            self.state = TrainerState.load_from_json(os.path.join(resume_dir, ckpt.TRAINER_STATE_NAME))
            if self.state.best_model_checkpoint and not os.path.isdir(self.state.best_model_checkpoint):
                self.state.best_model_checkpoint = None
            self.control = restore_callback_states(self.state, self.callback_handler, self.control)
            self._backend_state = backend.restore(self._backend_state, resume_dir)
            epochs_done = self.state.global_step // updates_per_epoch
            if not args.ignore_data_skip:
                skip_batches = (self.state.global_step % updates_per_epoch) * args.gradient_accumulation_steps
        self.state.init_training_references(self, max_steps, num_epochs, trial)
        self._sync_handler_refs(loader)
        counts_items, shifts = backend.counts_label_items()
        self._count_items, self._shift_labels = counts_items, shifts
        self._losses = LossTracker(args.logging_nan_inf_filter)
        self._nan = NanMonitor(args.nan_policy, self.state.global_step, lambda: backend.finalize(self._backend_state))
        self._last_logged = self.state.global_step
        initial_step = self.state.global_step
        self._tokens_at_start = self.state.num_input_tokens_seen
        self._throughput = ThroughputMeter(backend)  # tokens_per_second and mfu in the logs
        start_time = time.time()
        logger.info("Training: %s steps, %s epochs, backend=%s", max_steps, num_epochs, backend.name)

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
        return self._finish_training(initial_step, max_steps, loader, start_time, trial)

    def _sync_handler_refs(self, loader) -> None:
        handler = self.callback_handler
        handler.model = self.model
        handler.train_dataloader = loader
        bstate = self._backend_state
        handler.optimizer = getattr(bstate, "optimizer", None)
        handler.lr_scheduler = getattr(bstate, "scheduler", None)
        self.optimizer, self.lr_scheduler = handler.optimizer, handler.lr_scheduler

    def _windows(self, batches, first_update, updates_per_epoch, remainder):
        """Accumulation windows of one epoch: (host batches, label-token count), HF's chunking.

        Every window has gradient_accumulation_steps micro-batches except the epoch's last, which
        takes the remainder.
        """
        ga = self.args.gradient_accumulation_steps
        for update in range(first_update, updates_per_epoch):
            window = list(itertools.islice(batches, ga if update != updates_per_epoch - 1 else remainder))
            if not window:
                return
            num_items = data.count_label_items(window, self._shift_labels) if self._count_items else None
            if num_items is not None and self.args.average_tokens_across_devices:
                num_items = self.backend.all_sum(num_items)
            yield window, num_items

    def _run_epoch(self, loader, epoch, start_batch, batches_per_epoch, updates_per_epoch, trial, ignore_keys, start_time):
        args, backend = self.args, self.backend
        ga = args.gradient_accumulation_steps
        remainder = batches_per_epoch % ga or ga
        windows = self._windows(loader.epoch(epoch, start_batch), start_batch // ga, updates_per_epoch, remainder)
        step = start_batch - 1  # index of the last micro-batch consumed in this epoch
        metrics = None
        events = StepEvents(self)
        for window, num_items, device_window in prefetch_one(windows, backend.shard_window):
            self._track_tokens(window)
            self._throughput.add(window)
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            self._backend_state, metrics = backend.train_step(self._backend_state, device_window, num_items, events)
            step += len(window)
            self._losses.add(metrics.loss, self.state.global_step - self._last_logged)
            self._nan.observe(metrics)
            self.state.global_step += 1
            self.state.epoch = epoch + (step + 1) / batches_per_epoch
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            self._maybe_log_save_evaluate(metrics, trial, ignore_keys, start_time)
            preemption.stop_if_preempted(self)
            if self.control.should_epoch_stop or self.control.should_training_stop:
                break
        if step < 0:
            logger.warning("The training data yielded no batch in this epoch; stopping at step %s.", self.state.global_step)
            self.control.should_training_stop = True
        self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
        self._maybe_log_save_evaluate(metrics, trial, ignore_keys, start_time)

    def _track_tokens(self, window) -> None:
        mode = self.args.include_num_input_tokens_seen
        if mode in (False, None, "no"):
            return
        for batch in window:
            if mode == "non_padding" and "attention_mask" in batch:
                self.state.num_input_tokens_seen += int(np.asarray(batch["attention_mask"]).sum())
            elif "input_ids" in batch:
                self.state.num_input_tokens_seen += int(np.asarray(batch["input_ids"]).size)

    def _maybe_log_save_evaluate(self, metrics, trial, ignore_keys, start_time) -> None:
        if self.control.should_log and self.state.global_step > self._last_logged:
            logs: dict[str, float] = {}
            loss_sum = self._losses.drain(self.backend.to_host)
            logs["loss"] = loss_sum / (self.state.global_step - self._last_logged)
            if metrics is not None and metrics.grad_norm is not None:
                logs["grad_norm"] = float(self.backend.to_host(metrics.grad_norm))
            if metrics is not None:
                logs["learning_rate"] = metrics.learning_rate
            self._last_logged = self.state.global_step
            logs.update(self._throughput.report())
            self._nan.report(logs, self.backend.to_host)  # nan_policy: may raise, or log nan_skipped_steps
            self.log(logs, start_time)
        if self.control.should_evaluate:
            with self._throughput.paused():
                eval_metrics = self._evaluate(trial, ignore_keys)
            is_new_best = self._determine_best_metric(eval_metrics)
            if _value(self.args.save_strategy) == SaveStrategy.BEST.value:
                self.control.should_save = is_new_best
        if self.control.should_save:
            with self._throughput.paused():
                self._save_checkpoint()
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def _finish_training(self, initial_step, max_steps, loader, start_time, trial) -> TrainOutput:
        args = self.args
        self._losses.drain(self.backend.to_host)
        self._nan.report(None, self.backend.to_host)
        steps_run = self.state.global_step - initial_step
        train_loss = self._losses.total / max(steps_run, 0.001)
        samples = max_steps * args.per_device_train_batch_size * self.backend.local_batch_devices
        samples *= self.backend.num_processes * args.gradient_accumulation_steps
        if loader.has_length() and args.max_steps <= 0:
            samples = loader.num_examples * args.num_train_epochs
        metrics = speed_metrics("train", start_time, num_samples=samples * steps_run / max(max_steps, 1), num_steps=steps_run)
        metrics["total_flos"] = self.state.total_flos
        metrics["train_loss"] = train_loss
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
        return TrainOutput(self.state.global_step, train_loss, metrics)

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

    def _save_checkpoint(self) -> None:
        args, backend = self.args, self.backend
        run_dir = args.output_dir
        step = self._last_saved_step = self.state.global_step
        main = self.is_world_process_zero()
        with ckpt.atomic_checkpoint(run_dir, step, is_main=main, barrier=backend.barrier) as tmp:
            backend.save(self._backend_state, tmp, save_only_model=args.save_only_model)
            if self.state.best_global_step:
                best = os.path.join(run_dir, ckpt.checkpoint_dir_name(self.state.best_global_step))
                if self.state.best_global_step == step or os.path.isdir(best):
                    self.state.best_model_checkpoint = best
            if main:
                self.state.update_stateful_callbacks(self.callback_handler.callbacks + [self.control])
                self.state.save_to_json(os.path.join(tmp, ckpt.TRAINER_STATE_NAME))
                ckpt.save_training_args(args, tmp)
        if main:
            ckpt.rotate_checkpoints(run_dir, args.save_total_limit, self.state.best_model_checkpoint)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Writes the model where its own library loads it from (e.g. from_pretrained), plus training_args.bin."""
        output_dir = output_dir or self.args.output_dir
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise NotADirectoryError(f"Cannot save the model to {output_dir!r}: it exists and is a file.")
        os.makedirs(output_dir, exist_ok=True)
        self.backend.export_model(self._backend_state, output_dir)
        if self.is_world_process_zero():
            if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
                self.processing_class.save_pretrained(output_dir)
            ckpt.save_training_args(self.args, output_dir)

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
        return metrics

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Runs evaluation; returns metrics prefixed with metric_key_prefix (eval_loss, eval_<metric>, ...)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):
            metrics = {}
            for name, part in dataset.items():
                metrics.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
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
        return output.metrics

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test") -> PredictionOutput:
        """Runs prediction; returns PredictionOutput(predictions, label_ids, metrics)."""
        loader = self._loader(test_dataset, self.args.per_device_eval_batch_size, training=False)
        start = time.time()
        output = self.evaluation_loop(loader, "Prediction", ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        total_batch = self.args.per_device_eval_batch_size * self.backend.local_batch_devices
        output.metrics.update(
            speed_metrics(metric_key_prefix, start, num_samples=output.num_samples,
                          num_steps=math.ceil(output.num_samples / total_batch))
        )
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, metrics=output.metrics)
        return PredictionOutput(output.predictions, output.label_ids, output.metrics)

    def _prediction_step(self, state, batch, host_batch, prediction_loss_only, ignore_keys, num_items_in_batch):
        """One eval micro-batch (device `batch`, and the `host_batch` it came from) -> EvalOutput.

        The hook a subclass replaces to predict differently (Seq2SeqTrainer generates here).
        """
        return self.backend.eval_step(
            state, batch, prediction_loss_only, ignore_keys, self.label_names, num_items_in_batch=num_items_in_batch
        )

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval") -> EvalLoopOutput:
        """The loop shared by evaluate() and predict(): batches -> eval_step -> host arrays -> metrics."""
        from .evaluation import run_evaluation

        return run_evaluation(self, dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)


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
