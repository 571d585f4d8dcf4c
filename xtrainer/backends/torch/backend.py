"""Native PyTorch backend: eager or torch.compile, torch.amp, DDP / FSDP2 through torch.distributed.

The optimizer step follows transformers' Trainer operation for operation (loss scaling for gradient
accumulation, clipping, optimizer then scheduler step), so that with equal data and seeds the two
produce the same log history and weights.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..base import EvalOutput, StepMetrics
from . import coordination, distributed, fsdp, optim, save_snapshot, state_io
from .device_cache import CacheEmptier
from .nan_guard import make_nan_guard
from .neftune import Neftune
from .optim import build_optimizer, decay_parameter_names
from .schedulers import build_lr_scheduler, current_lr, is_metric_driven, step_with_metric


@dataclass
class TorchState:
    """What a torch training run carries between steps (mutated in place by the steps)."""

    model: nn.Module  # the module that runs forward: DDP/FSDP/compiled wrapper or the model itself
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    scaler: Any = None
    nan_guard: Any = None  # nan_guard.NanGuard under nan_policy "skip"/"raise"


def _accepts_loss_kwargs(model: nn.Module) -> bool:
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _loss_shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss is a causal-LM loss (labels shifted by one), as HF decides it."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:
        return False
    config = getattr(model, "config", None)
    return LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss and not getattr(
        config, "is_encoder_decoder", False
    )


def _is_causal_lm_class(model: nn.Module) -> bool:
    """Whether transformers lists the model's class as a causal LM (its label smoother then shifts labels)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return False
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _label_names(model: nn.Module) -> list[str]:
    """Forward arguments that carry labels (HF's find_labels)."""
    params = inspect.signature(model.forward).parameters
    if "QuestionAnswering" in type(model).__name__:
        return [p for p in params if "label" in p or p in ("start_positions", "end_positions")]
    return [p for p in params if "label" in p]


class TorchBackend:
    """Runs PyTorch modules natively on CPU, CUDA or ROCm (see module docstring)."""

    name = "torch"

    def __init__(self):
        self.num_processes = 1
        self.process_index = 0
        self.local_batch_devices = 1
        self.device = torch.device("cpu")
        self._host_groups = None
        self._agreement = None

    # ------------------------------------------------------------------ setup

    def prepare(self, model: nn.Module, args: Any, *, hooks: Any) -> nn.Module:
        if not isinstance(model, nn.Module):
            raise TypeError(f"backend='torch' needs a torch.nn.Module, got {type(model).__name__}.")
        self.args = args
        self.hooks = hooks
        self._optimizer = None  # the optimizer of the run in progress (schedule-free optimizers switch modes)
        self._scaler = None
        self._lomo_lr = None  # LOMO's lr for the fused backward of the current step
        self.dist = distributed.init_from_env(args)
        self.num_processes, self.process_index = self.dist.world_size, self.dist.rank
        if self.num_processes > 1 and self._host_groups is None:  # preemption and save agreement (coordination.py)
            self._host_groups = coordination.HostGroups(getattr(args, "ddp_timeout", None) or 1800)
        self.device = self._pick_device(args)
        self.amp_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        if args.fp16 and self.device.type == "cpu" and not hasattr(torch.amp, "GradScaler"):
            raise ValueError("fp16=True needs torch.amp.GradScaler; use bf16=True on CPU.")
        fsdp_options = fsdp.options(args)
        # cpu_ram_efficient_loading: the weights move to the devices shard by shard (fsdp.shard), never whole,
        # and processes other than rank 0 may hold a meta-device model.
        lazy = self.dist.sharded and fsdp_options.cpu_ram_efficient_loading
        self.model = model if lazy else model.to(self.device)
        self.sharded_checkpoints = self.dist.sharded and fsdp_options.sharded_state_dict
        apply_tf32(args.tf32, self.device)
        watch_underflow_overflow(model, args)
        if args.activation_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                raise ValueError(
                    "activation_checkpointing=True (gradient_checkpointing) needs a model with "
                    f"`gradient_checkpointing_enable()` (transformers models have it); {type(model).__name__} does not."
                )
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.activation_checkpointing_kwargs)
        self.accepts_loss_kwargs = _accepts_loss_kwargs(model)
        self.shifts_labels = _loss_shifts_labels(model)
        self.is_causal_lm = _is_causal_lm_class(model)
        self.neftune = Neftune(args.neftune_noise_alpha, model)  # hooks attached for each train() run
        self.cache_emptier = CacheEmptier(args.torch_empty_cache_steps, self.device)
        return model

    @property
    def model_accepts_loss_kwargs(self) -> bool:
        return self.accepts_loss_kwargs

    @property
    def looks_up_token_ids(self) -> bool:
        """Whether input_ids feed an embedding lookup (a transformers model's input embeddings)."""
        return _has_input_embeddings(self.model)

    @property
    def can_return_loss(self) -> bool:
        return _can_return_loss(self.model)

    @property
    def is_fsdp_enabled(self) -> bool:
        return self.dist.fsdp

    @property
    def writes_checkpoint_files(self) -> bool:
        """Whether this process owns checkpoint directories (checkpoint_writer): rank 0, or with save_on_each_node
        the first process of each node."""
        return self.dist.writes_checkpoints

    def _pick_device(self, args) -> torch.device:
        if getattr(args, "use_cpu", False) or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", self.dist.local_rank)

    def model_input_names(self) -> list[str] | None:
        return list(inspect.signature(self.model.forward).parameters)

    @property
    def pins_host_memory(self) -> bool:
        """Whether batches in page-locked memory are copied asynchronously (dataloader_pin_memory acts)."""
        return self.device.type == "cuda"

    def default_label_names(self) -> list[str]:
        return _label_names(self.model)

    def counts_label_items(self) -> tuple[bool, bool]:
        counts = self.accepts_loss_kwargs or self.hooks.compute_loss_func is not None
        return counts, self.shifts_labels

    def wrap_for_training(self) -> nn.Module:
        """The module that runs forward in training: DDP / FSDP2 / torch.compile around the model (or the
        model itself); FSDP2 shards the model in place, so build the optimizer after this."""
        args = self.args
        self._in_train = True  # until finalize: evaluations use the training precision (bf16/fp16_full_eval do not apply)
        self.neftune.attach(self.model)
        self.cache_emptier.steps_done = 0
        runner = distributed.wrap_model(self.model, args, self.dist, self.device)
        if args.torch_compile:
            runner = torch.compile(
                runner, backend=args.torch_compile_backend or "inductor", mode=args.torch_compile_mode
            )
        self.runner = runner
        return runner

    def optimizer_target(self) -> nn.Module:
        """The module whose parameters the optimizer updates (transformers' `self.model`)."""
        return self.model

    def decay_parameter_names(self, model: nn.Module) -> list[str]:
        return decay_parameter_names(model)

    def create_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """transformers' default optimizer: decay / no-decay groups from the (overridable)
        get_decay_parameter_names, class and kwargs from optimizer_cls_and_kwargs."""
        hooks = self.hooks
        decay = set(hooks.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups: Any = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        if hooks.explicit_optimizer_cls_and_kwargs is None:
            optim.warn_dropped_weight_decay(self.args)
        # Own groups (GaLore), the model (LOMO), layer-wise dicts and factories: optim.build_optimizer.
        return build_optimizer(model, self.args, hooks.optimizer_cls_and_kwargs(model), device_type=self.device.type,
                               groups=groups)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer):
        return build_lr_scheduler(optimizer, self.args, num_training_steps)

    def init_state(self, num_training_steps: int, optimizer: Any, scheduler: Any) -> TorchState:
        args = self.args
        runner = self.runner if getattr(self, "runner", None) is not None else self.wrap_for_training()
        scaler = None
        if args.fp16:
            scaler = torch.amp.GradScaler(self.device.type)
        guard = make_nan_guard(args, self.device, loss_scaling=scaler is not None)
        self._optimizer, self._scaler = optimizer, scaler
        self._agreement = coordination.PreemptionAgreement(self._host_groups.preemption) if self._host_groups else None
        return TorchState(model=runner, optimizer=optimizer, scheduler=scheduler, scaler=scaler, nan_guard=guard)

    # ------------------------------------------------------------------ steps

    def shard_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        non_blocking = self.device.type == "cuda"
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device, non_blocking=non_blocking) for k, v in batch.items()}

    def shard_window(self, window: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, torch.Tensor]]:
        return [self.shard_batch(batch) for batch in window]

    def autocast_context(self, cache_enabled: bool | None = True):
        """torch.amp autocast for bf16/fp16 runs (what the Trainer's autocast_smart_context_manager returns)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, cache_enabled=cache_enabled)

    def prepare_inputs(self, inputs: Any) -> Any:
        """Tensors (nested in dicts / lists) moved to the run's device, as transformers' _prepare_inputs does."""
        if isinstance(inputs, Mapping):
            return type(inputs)({k: self.prepare_inputs(v) for k, v in inputs.items()})
        if isinstance(inputs, (tuple, list)):
            return type(inputs)(self.prepare_inputs(v) for v in inputs)
        if isinstance(inputs, torch.Tensor):
            return inputs.to(self.device)
        return inputs

    def compute_loss(self, model, inputs: Mapping, return_outputs: bool = False, num_items_in_batch=None):
        """The Trainer's default compute_loss: the model's own loss, compute_loss_func, or label smoothing."""
        inputs = dict(inputs)
        smoothing = self.hooks.label_smoothing_factor
        compute_loss_func = self.hooks.compute_loss_func
        # A user loss or label smoothing takes the labels away from the model (as in HF).
        takes_labels = (compute_loss_func is not None or smoothing) and "labels" in inputs
        labels = inputs.pop("labels", None) if takes_labels else None
        if self.accepts_loss_kwargs and num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs)
        if compute_loss_func is not None:
            loss = compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        elif labels is not None:
            logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
            loss = label_smoothed_loss(logits, labels, smoothing, num_items_in_batch, shift=self.is_causal_lm)
        else:
            loss = _extract_loss(outputs, inputs)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and (
            self.accepts_loss_kwargs or compute_loss_func is not None
        ):
            loss = loss * self.num_processes
        return (loss, outputs) if return_outputs else loss

    def _num_items_tensor(self, num_items: int | None):
        # HF hands the model a float32 tensor (the count divided by the parallel degrees), so the
        # division inside the loss happens in float32 exactly as there.
        return None if num_items is None else torch.tensor(float(num_items), dtype=torch.float32, device=self.device)

    def loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether compute_loss already normalised over the whole window (transformers' rule): the user's
        `loss_is_scaled_for_ga` when set, else whether the model or compute_loss_func took num_items."""
        stated = self.hooks.loss_is_scaled_for_ga
        if stated is not None:
            return bool(stated)
        return (self.accepts_loss_kwargs and num_items_in_batch is not None) or self.hooks.compute_loss_func is not None

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward() (scaled under fp16), or LOMO's fused backward that also applies the update."""
        optim.backward(loss, self._optimizer, self._lomo_lr, self._scaler)

    def training_step(self, model, inputs: Mapping, num_items_in_batch=None) -> torch.Tensor:
        """The Trainer's default training_step: forward through the hooks, then backward (transformers' order)."""
        hooks = self.hooks
        model.train()
        optim.train_mode(self._optimizer)  # schedule-free optimizers: back to the training weights
        inputs = hooks.prepare_inputs(inputs)
        with hooks.compute_loss_context_manager():
            loss = hooks.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        self.cache_emptier.after_forward()  # torch_empty_cache_steps: where transformers' training_step empties it
        if not self.loss_is_scaled_for_ga(num_items_in_batch):
            loss = loss / hooks.current_gradient_accumulation_steps
        self.backward(loss)
        return loss.detach()

    def train_step(self, state: TorchState, window: Sequence[dict], num_items_in_batch: int | None, events):
        model, optimizer = state.model, state.optimizer
        lomo = optim.is_lomo(optimizer)  # LOMO updates inside its backward, at the lr before this step's schedule
        scaler = None if lomo else state.scaler
        self._optimizer, self._scaler = optimizer, scaler
        self._lomo_lr = current_lr(state.scheduler, optimizer) if lomo else None
        num_items = self._num_items_tensor(num_items_in_batch)
        losses = []
        for i, inputs in enumerate(window):
            # DDP all-reduces gradients on the last micro-batch of the window only.
            sync = contextlib.nullcontext() if i == len(window) - 1 else distributed.no_sync(model)
            with sync:
                loss = self.hooks.training_step(model, inputs, num_items)
            losses.append(torch.as_tensor(loss).detach().float().to(self.device))
            if i < len(window) - 1:
                events.substep_end()
        if scaler is not None:
            scaler.unscale_(optimizer)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else float("inf")
        grad_norm = distributed.clip_grad_norm(model, max_norm)
        events.pre_optimizer_step()
        # HF logs the mean over processes of each process's loss (its gathered tr_loss). Computed
        # before the NaN guard, which reads it: one process's NaN loss is then every process's, and
        # all of them skip (or stop) together; the gradient norm is already the same everywhere.
        loss = distributed.mean_over_processes(torch.stack(losses), self.dist)
        guard = state.nan_guard
        guarded = contextlib.nullcontext()
        if guard is not None:  # nan_policy skip/raise: the update is selected on device (nan_guard.py)
            guarded = guard.guarded_step(optimizer, guard.update(list(loss), grad_norm), state.scaler)
        if scaler is not None:
            scale_before = scaler.get_scale()
            with guarded:
                scaler.step(optimizer)
                scaler.update()
            skipped = scaler.get_scale() < scale_before  # an overflow skips the step (and the schedule)
        else:
            if not lomo:  # LOMO's step is a no-op: its backward applied the update
                with guarded:
                    optimizer.step()
            skipped = False
        events.optimizer_step()
        self.cache_emptier.after_optimizer_step()
        learning_rate = current_lr(state.scheduler, optimizer)
        # A metric-driven scheduler (ReduceLROnPlateau, GreedyLR, ...) moves after evaluation instead.
        if not skipped and not is_metric_driven(state.scheduler):
            state.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        nonfinite = guard.report() if guard else None
        return state, StepMetrics(loss=loss, grad_norm=grad_norm, learning_rate=learning_rate, nonfinite=nonfinite)

    # ------------------------------------------------------------------ evaluation

    def eval_model(self, state) -> nn.Module:
        """The model that prediction_step receives: the training wrapper during a run, else the model."""
        self._apply_full_eval_dtype()
        return state.model if state is not None else self.model

    def _apply_full_eval_dtype(self) -> None:
        """bf16/fp16_full_eval: an evaluation outside train() runs the model cast to that dtype.

        As in transformers, the cast is in place (no second copy of the weights: that is the memory
        the option saves), so the model stays in that dtype afterwards.
        """
        dtype = torch.bfloat16 if self.args.bf16_full_eval else torch.float16 if self.args.fp16_full_eval else None
        if dtype is not None and not getattr(self, "_in_train", False):
            self.model.to(dtype=dtype)

    def eval_inputs(self, batch: dict) -> dict:
        return batch

    def metrics_view(self, tree: Any) -> Any:
        """Eval outputs as preprocess_logits_for_metrics / batch_eval_metrics receive them (torch tensors)."""
        return tree

    def trim_padding(self, output: tuple, inputs: Any) -> tuple:
        """prediction_step output without rows the backend added (none on torch)."""
        return output

    def _eval_num_items(self, inputs: Mapping):
        """transformers' num_items_in_batch for one eval batch (None when the loss does not take it).

        Every process evaluates the same batch here, so the count it would gather over processes is this
        count times their number."""
        counts, shifts = self.counts_label_items()
        labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
        if not counts or not isinstance(labels, torch.Tensor):
            return None
        labels = inputs["shift_labels"] if "shift_labels" in inputs else labels[..., 1:] if shifts else labels
        count = labels.ne(-100).sum().to(torch.float32)
        return count * self.num_processes if self.args.average_tokens_across_devices else count

    def prediction_step(self, model, inputs: Mapping, prediction_loss_only: bool, ignore_keys=None,
                        count_items: bool = True):
        """The Trainer's default prediction_step: (loss, logits, labels), as transformers computes them."""
        hooks = self.hooks
        label_names = hooks.label_names
        model.eval()
        if callable(getattr(self._optimizer, "eval", None)):  # schedule-free: evaluate the averaged weights
            self._optimizer.eval()
        has_labels = bool(label_names) and all(inputs.get(k) is not None for k in label_names)
        return_loss = inputs.get("return_loss")
        if return_loss is None:
            return_loss = _can_return_loss(self.model)
        loss_without_labels = not label_names and return_loss
        inputs = hooks.prepare_inputs(inputs)
        if ignore_keys is None:
            config = getattr(self.model, "config", None)
            ignore_keys = list(getattr(config, "keys_to_ignore_at_inference", ["cache"]) or []) if config is not None else []
        labels = None
        if has_labels or loss_without_labels:  # before the loss: it may pop them (label smoothing)
            found = tuple(inputs.get(name) for name in label_names)
            labels = found[0] if len(found) == 1 else (found or None)
        with torch.no_grad():
            if has_labels or loss_without_labels:
                num_items = self._eval_num_items(inputs) if count_items else None
                with hooks.compute_loss_context_manager():
                    loss, outputs = hooks.compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items)
                loss = loss.detach().float().mean()
            else:
                loss = None
                with hooks.compute_loss_context_manager():
                    outputs = model(**inputs)
        if prediction_loss_only:
            return EvalOutput(loss, None, None)
        skip = set(ignore_keys) | ({"loss"} if has_labels or loss_without_labels else set())
        if isinstance(outputs, Mapping):
            logits = tuple(v for k, v in outputs.items() if k not in skip and v is not None)
        elif isinstance(outputs, torch.Tensor):
            logits = (outputs,)
        else:
            logits = tuple(outputs[1:] if has_labels or loss_without_labels else outputs)
        logits = tuple(t.detach() for t in logits if isinstance(t, torch.Tensor))
        if len(logits) == 1:
            logits = logits[0]
        elif len(logits) == 0:
            logits = None
        return EvalOutput(loss, logits, labels)

    def generate(self, model, inputs, gen_kwargs: dict):
        """HF `generate` on the unwrapped model, in eval mode without gradients (see generation.py)."""
        from .generation import hf_generate

        return hf_generate(self.model, inputs, gen_kwargs, autocast=self.autocast_context(), synced_gpus=bool(self.dist.fsdp))

    def step_flops(self) -> float | None:
        return None  # eager torch has no compiled program to ask; no MFU in the logs

    def peak_flops(self) -> float | None:
        return None

    def to_host(self, tree: Any) -> Any:
        if isinstance(tree, torch.Tensor):
            tree = tree.detach()
            if tree.dtype == torch.bfloat16:
                tree = tree.float()
            return tree.cpu().numpy()
        if isinstance(tree, (list, tuple)):
            return type(tree)(self.to_host(t) for t in tree)
        if isinstance(tree, Mapping):
            return {k: self.to_host(v) for k, v in tree.items()}
        return tree

    def repeat_scalar(self, value: torch.Tensor, times: int) -> torch.Tensor:
        return value.reshape(1).repeat(times)

    def all_sum(self, value: int) -> int:
        return distributed.all_sum(value, self.dist, self.device)

    def on_eval_metric(self, state: TorchState, value: float) -> None:
        step_with_metric(state.scheduler, value)  # the metric-driven ones, the user's included; others are left alone

    # ------------------------------------------------------------------ state I/O

    #: The model weights live in their own files (model.safetensors), written through the Trainer's `_save`.
    weights_restored_with_state = False

    @property
    def model_files_in_checkpoints(self) -> bool:
        """Checkpoints hold the model files (transformers' layout), written through the Trainer's `_save`;
        not with fsdp_config state_dict_type="SHARDED_STATE_DICT", where each rank writes its shards (save_async)."""
        return not getattr(self, "sharded_checkpoints", False)

    def model_state_for_save(self, state, copy: bool = False) -> dict | None:
        """Full weights gathered for writing (collective under FSDP); None when the model holds them whole.

        copy=True: a host copy, for a write that happens later while training goes on (tied weights stay tied)."""
        gathered = state_io.gather_model_state(self.model, self.dist)
        if copy and gathered is None and self.dist.writes_checkpoints:
            return save_snapshot.host_copy(self.model.state_dict())
        return gathered

    def save(self, state: TorchState, directory: str, *, save_only_model: bool = False) -> None:
        """Optimizer, scheduler, scaler and RNG state (the model files are written by the Trainer's `_save`)."""
        self.save_async(state, directory, save_only_model=save_only_model, background=False)()

    def save_async(self, state: TorchState, directory: str, *, save_only_model: bool = False,
                   outcome_tag: str | None = None, background: bool = True):
        """Captures the training state now; returns the function that writes its files.

        background=True: every tensor is copied to host memory first, so the returned function may
        run in another thread while training goes on (save_snapshot.py); False: it runs right away.
        """
        if getattr(self, "sharded_checkpoints", False):  # fsdp_config state_dict_type="SHARDED_STATE_DICT": per-rank shards, now
            os.makedirs(directory, exist_ok=True)  # (collective, and before the weights change)
            fsdp.save_sharded_model(self.model, directory, self.dist.is_main)
        group = self._host_groups.checkpoint if self._host_groups else None
        snapshot = save_snapshot.capture(self.model, state, self.dist, save_only_model=save_only_model,
                                         copy=background, group=group, include_weights=False)
        save_snapshot.start(snapshot, directory)
        return lambda: save_snapshot.write(snapshot, directory)

    def exchange(self, tag: str, value) -> list:
        """Every process's `value` (small, picklable), in rank order; may run in a background thread."""
        if self._host_groups is None:
            return [value]
        return coordination.exchange(value, self._host_groups.checkpoint, self.num_processes)

    def _load_weights(self, directory: str, unsafe: bool) -> None:
        if fsdp.has_sharded_model(directory):  # written with state_dict_type="SHARDED_STATE_DICT"
            fsdp.load_sharded_model(self.model, directory, distributed=self.dist.world_size > 1)
        else:
            state_io.load_model_weights(self.model, directory, self.dist, allow_unsafe=unsafe)

    def restore(self, state: TorchState, directory: str, *, include_model: bool = True) -> TorchState:
        unsafe = bool(getattr(self.args, "allow_unsafe_checkpoint_load", False))
        if include_model:
            self._load_weights(directory, unsafe)
        state_io.load_training_state(state, directory, self.dist, allow_unsafe=unsafe)
        self.cache_emptier.resume_from(directory)
        return state

    def load_model_weights(self, state, directory: str) -> None:
        unsafe = bool(getattr(self.args, "allow_unsafe_checkpoint_load", False))
        self._load_weights(directory, unsafe)

    def export_model(self, state, directory: str, state_dict: dict | None = None) -> None:
        """Writes the model's files (main process; `state_dict` from model_state_for_save when sharded)."""
        state_io.write_model_weights(self.model, directory, state_dict)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def end(self) -> None:
        """Destroys the process group this run joined (transformers' Trainer.end)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # torchrun's, or one the script set up itself
            dist.destroy_process_group()

    def learning_rates(self, optimizer) -> list[float]:
        return [group["lr"] for group in optimizer.param_groups]

    def optimizer_group(self, optimizer, param=None):
        if param is not None:
            for group in optimizer.param_groups:
                if any(p is param for p in group["params"]):
                    return group
        return [group["params"] for group in optimizer.param_groups]

    def finalize(self, state) -> nn.Module:
        self._in_train = False
        self.neftune.detach()
        return self.model

    def barrier(self) -> None:
        distributed.barrier(self.dist)

    def preemption_requested(self, step: int, local_flag: bool, *, final: bool = False) -> bool:
        # Several processes: they agree through a non-blocking all-reduce of the flag on a gloo
        # group of its own, read one step later (coordination.PreemptionAgreement).
        if self._agreement is None:
            return local_flag
        return self._agreement.at_end() if final else self._agreement.at_step(local_flag)


def apply_tf32(tf32: bool | None, device: torch.device) -> None:
    """args.tf32 as transformers applies it: None leaves torch's setting; True/False switches TF32 matmuls and
    cuDNN convolutions, and True without a CUDA device that has them is an error."""
    if tf32 is None:
        return
    if tf32 and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8):
        raise ValueError(
            f"tf32=True needs an Ampere or newer CUDA GPU; this run's device is {device}. Leave tf32 unset (None) or "
            "set it to False."
        )
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)


def watch_underflow_overflow(model: nn.Module, args) -> None:
    """debug="underflow_overflow": transformers' detector hooks every module and reports the first inf/nan."""
    if "underflow_overflow" not in [getattr(d, "value", d) for d in getattr(args, "debug", []) or []]:
        return
    from transformers.debug_utils import DebugUnderflowOverflow

    DebugUnderflowOverflow(model)


def label_smoothed_loss(logits, labels, epsilon: float, num_items=None, shift: bool = False) -> torch.Tensor:
    """Cross entropy with label smoothing, as transformers' LabelSmoother computes it.

    Positions labelled -100 do not count; with `num_items` the sums are divided by the window's
    token count (HF's gradient-accumulation normalisation); `shift` aligns causal-LM labels.
    """
    if shift:
        logits, labels = logits[..., :-1, :].contiguous(), labels[..., 1:].contiguous()
    log_probs = -nn.functional.log_softmax(logits, dim=-1)
    if labels.dim() == log_probs.dim() - 1:
        labels = labels.unsqueeze(-1)
    padding = labels.eq(-100)
    nll = log_probs.gather(dim=-1, index=torch.clamp(labels, min=0)).masked_fill(padding, 0.0)
    smoothed = log_probs.sum(dim=-1, keepdim=True, dtype=torch.float32).masked_fill(padding, 0.0)
    active = num_items if num_items is not None else padding.numel() - padding.long().sum()
    return (1 - epsilon) * nll.sum() / active + epsilon * smoothed.sum() / (active * log_probs.shape[-1])


def _has_input_embeddings(model) -> bool:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        return callable(getter) and isinstance(getter(), nn.Embedding)
    except Exception:  # a model whose getter is not implemented
        return False


def _can_return_loss(model: nn.Module) -> bool:
    """Whether forward has a `return_loss` argument defaulting to True (CLIP-like models; transformers' rule)."""
    try:
        param = inspect.signature(model.forward).parameters.get("return_loss")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is True


def _extract_loss(outputs: Any, inputs: Mapping) -> torch.Tensor:
    """The loss in a model's outputs, or a clear error naming what is missing."""
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
        if loss is None:
            raise ValueError(
                "The model did not return a loss: its outputs have keys "
                f"{[k for k, v in outputs.items() if v is not None]} and it received inputs {sorted(inputs)}. "
                "Give the dataset a `labels` column (or set `label_names`), or pass `compute_loss_func`."
            )
        return loss
    if isinstance(outputs, torch.Tensor):
        if outputs.dim() == 0:
            return outputs
        raise ValueError(
            f"The model returned a tensor of shape {tuple(outputs.shape)}, not a loss. Return the loss "
            "(a scalar, or first element of a tuple / `loss` key of a dict), or pass `compute_loss_func`."
        )
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor) and outputs[0].dim() == 0:
        return outputs[0]
    raise ValueError(
        f"The model did not return a loss (got {type(outputs).__name__}); it received inputs {sorted(inputs)}. "
        "Give the dataset a `labels` column or pass `compute_loss_func`."
    )
