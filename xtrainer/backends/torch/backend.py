"""Native PyTorch backend: eager or torch.compile, torch.amp, DDP / FSDP2 through torch.distributed.

The optimizer step follows transformers' Trainer operation for operation (loss scaling for gradient
accumulation, clipping, optimizer then scheduler step), so that with equal data and seeds the two
produce the same log history and weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ...schedules import plateau_from_args, plateau_update, schedule_from_args
from ..base import EvalOutput, StepMetrics
from . import distributed, state_io
from .nan_guard import make_nan_guard
from .optim import build_optimizer


@dataclass
class TorchState:
    """What a torch training run carries between steps (mutated in place by the steps)."""

    model: nn.Module  # the module that runs forward: DDP/FSDP/compiled wrapper or the model itself
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    scaler: Any = None
    nan_guard: Any = None  # nan_guard.NanGuard under nan_policy "skip"/"raise"


class PlateauScheduler(torch.optim.lr_scheduler.LRScheduler):
    """reduce_lr_on_plateau driven by the shared pure `plateau_update`, checkpointable like any scheduler.

    Stepping once per optimizer step leaves the lr alone; `observe(metric)` after each evaluation
    may reduce it.
    """

    def __init__(self, optimizer, plateau_state):
        self.plateau = plateau_state
        super().__init__(optimizer)

    def get_lr(self):
        plateau = self.plateau
        return [plateau.lr if base == plateau.base_lr else base * plateau.multiplier for base in self.base_lrs]

    def observe(self, metric: float) -> None:
        self.plateau = plateau_update(self.plateau, metric)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def step(self, epoch=None):
        self._step_count = getattr(self, "_step_count", 0) + 1
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        # Plain values only, so the file loads with weights_only=True.
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "plateau")}
        state["plateau"] = dataclasses.asdict(self.plateau)
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.plateau = type(self.plateau)(**state_dict.pop("plateau"))
        self.__dict__.update(state_dict)


def build_lr_scheduler(optimizer, args, num_training_steps: int):
    """A torch scheduler driven by the shared schedules: LambdaLR, or PlateauScheduler for reduce_lr_on_plateau."""
    plateau = plateau_from_args(args)
    if plateau is not None:
        return PlateauScheduler(optimizer, plateau)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_from_args(args, num_training_steps))


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

    # ------------------------------------------------------------------ setup

    def prepare(self, model: nn.Module, args: Any, *, compute_loss_func: Any = None) -> nn.Module:
        if not isinstance(model, nn.Module):
            raise TypeError(f"backend='torch' needs a torch.nn.Module, got {type(model).__name__}.")
        self.args = args
        self.compute_loss_func = compute_loss_func
        self.dist = distributed.init_from_env(args)
        self.num_processes, self.process_index = self.dist.world_size, self.dist.rank
        self.device = self._pick_device(args)
        self.amp_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        if args.fp16 and self.device.type == "cpu" and not hasattr(torch.amp, "GradScaler"):
            raise ValueError("fp16=True needs torch.amp.GradScaler; use bf16=True on CPU.")
        self.model = model.to(self.device)
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
        return model

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
        counts = self.accepts_loss_kwargs or self.compute_loss_func is not None
        return counts, self.shifts_labels

    def init_state(self, num_training_steps: int, optimizers: tuple = (None, None)) -> TorchState:
        args = self.args
        runner = distributed.wrap_model(self.model, args, self.dist, self.device)
        if args.torch_compile:
            runner = torch.compile(
                runner, backend=args.torch_compile_backend or "inductor", mode=args.torch_compile_mode
            )
        optimizer, scheduler = optimizers
        optimizer = optimizer or build_optimizer(runner if self.dist.fsdp else self.model, args)
        if scheduler is None:
            scheduler = build_lr_scheduler(optimizer, args, num_training_steps)
        scaler = None
        if args.fp16:
            scaler = torch.amp.GradScaler(self.device.type)
        guard = make_nan_guard(args, self.device, loss_scaling=scaler is not None)
        return TorchState(model=runner, optimizer=optimizer, scheduler=scheduler, scaler=scaler, nan_guard=guard)

    # ------------------------------------------------------------------ steps

    def shard_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        non_blocking = self.device.type == "cuda"
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device, non_blocking=non_blocking) for k, v in batch.items()}

    def shard_window(self, window: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, torch.Tensor]]:
        return [self.shard_batch(batch) for batch in window]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _compute_loss(self, model, inputs: dict, num_items, return_outputs: bool = False):
        inputs = dict(inputs)
        smoothing = self.args.label_smoothing_factor
        # A user loss or label smoothing takes the labels away from the model (as in HF).
        takes_labels = self.compute_loss_func is not None or (smoothing and "labels" in inputs)
        labels = inputs.pop("labels", None) if takes_labels else None
        if self.accepts_loss_kwargs and num_items is not None:
            inputs["num_items_in_batch"] = num_items
        outputs = model(**inputs)
        if self.compute_loss_func is not None:
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items)
        elif labels is not None:
            logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
            loss = label_smoothed_loss(logits, labels, smoothing, num_items, shift=self.is_causal_lm)
        else:
            loss = _extract_loss(outputs, inputs)
        if self.args.average_tokens_across_devices and num_items is not None and (
            self.accepts_loss_kwargs or self.compute_loss_func is not None
        ):
            loss = loss * self.num_processes
        return (loss, outputs) if return_outputs else loss

    def _num_items_tensor(self, num_items: int | None):
        # HF hands the model a float32 tensor (the count divided by the parallel degrees), so the
        # division inside the loss happens in float32 exactly as there.
        return None if num_items is None else torch.tensor(float(num_items), dtype=torch.float32, device=self.device)

    def train_step(self, state: TorchState, window: Sequence[dict], num_items_in_batch: int | None, events):
        model, optimizer = state.model, state.optimizer
        model.train()
        num_items = self._num_items_tensor(num_items_in_batch)
        scaled_for_ga = (self.accepts_loss_kwargs and num_items is not None) or self.compute_loss_func is not None
        losses = []
        for i, inputs in enumerate(window):
            # DDP all-reduces gradients on the last micro-batch of the window only.
            sync = contextlib.nullcontext() if i == len(window) - 1 else distributed.no_sync(model)
            with sync:
                with self._autocast():
                    loss = self._compute_loss(model, inputs, num_items)
                if not scaled_for_ga:
                    loss = loss / len(window)
                if state.scaler is not None:
                    state.scaler.scale(loss).backward()
                else:
                    loss.backward()
            losses.append(loss.detach().float())
            if i < len(window) - 1:
                events.substep_end()
        if state.scaler is not None:
            state.scaler.unscale_(optimizer)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else float("inf")
        grad_norm = distributed.clip_grad_norm(model, max_norm)
        events.pre_optimizer_step()
        guard = state.nan_guard
        guarded = contextlib.nullcontext()
        if guard is not None:  # nan_policy skip/raise: the update is selected on device (nan_guard.py)
            guarded = guard.guarded_step(optimizer, guard.update(losses, grad_norm), state.scaler)
        if state.scaler is not None:
            scale_before = state.scaler.get_scale()
            with guarded:
                state.scaler.step(optimizer)
                state.scaler.update()
            skipped = state.scaler.get_scale() < scale_before  # an overflow skips the step (and the schedule)
        else:
            with guarded:
                optimizer.step()
            skipped = False
        events.optimizer_step()
        learning_rate = _current_lr(state.scheduler, optimizer)
        if not skipped:
            state.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # HF logs the mean over processes of each process's loss (its gathered tr_loss).
        loss = distributed.mean_over_processes(torch.stack(losses), self.dist)
        nonfinite = guard.report() if guard else None
        return state, StepMetrics(loss=loss, grad_norm=grad_norm, learning_rate=learning_rate, nonfinite=nonfinite)

    def eval_step(self, state, batch, prediction_loss_only, ignore_keys, label_names, num_items_in_batch=None):
        model = state.model if state is not None else self.model
        model.eval()
        has_labels = bool(label_names) and all(batch.get(k) is not None for k in label_names)
        if ignore_keys is None:
            config = getattr(self.model, "config", None)
            ignore_keys = list(getattr(config, "keys_to_ignore_at_inference", None) or []) if config is not None else []
        labels = None
        if has_labels:
            found = tuple(batch[name] for name in label_names)
            labels = found[0] if len(found) == 1 else found
        with torch.no_grad(), self._autocast():
            if has_labels:
                loss, outputs = self._compute_loss(model, batch, self._num_items_tensor(num_items_in_batch), return_outputs=True)
                loss = loss.detach().float().mean()
            else:
                loss = None
                outputs = model(**batch)
        if prediction_loss_only:
            return EvalOutput(loss, None, None)
        if isinstance(outputs, Mapping):
            skip = set(ignore_keys) | ({"loss"} if has_labels else set())
            logits = tuple(v for k, v in outputs.items() if k not in skip and v is not None)
        elif isinstance(outputs, torch.Tensor):
            logits = (outputs,)
        else:
            logits = tuple(outputs[1:] if has_labels else outputs)
        logits = tuple(t.detach() for t in logits if isinstance(t, torch.Tensor))
        if len(logits) == 1:
            logits = logits[0]
        elif len(logits) == 0:
            logits = None
        return EvalOutput(loss, logits, labels)

    def generate(self, state, batch, gen_kwargs: dict):
        """HF `generate` on the unwrapped model, in eval mode without gradients (see generation.py)."""
        from .generation import hf_generate

        return hf_generate(self.model, batch, gen_kwargs, autocast=self._autocast(), synced_gpus=bool(self.dist.fsdp))

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
        if isinstance(state.scheduler, PlateauScheduler):
            state.scheduler.observe(value)
        elif isinstance(state.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            state.scheduler.step(value)

    # ------------------------------------------------------------------ state I/O

    def save(self, state: TorchState, directory: str, *, save_only_model: bool = False) -> None:
        state_io.save_model_weights(self.model, directory, self.dist)
        if not save_only_model:
            state_io.save_training_state(state, directory, self.dist)

    def restore(self, state: TorchState, directory: str) -> TorchState:
        unsafe = bool(getattr(self.args, "allow_unsafe_checkpoint_load", False))
        state_io.load_model_weights(self.model, directory, self.dist, allow_unsafe=unsafe)
        state_io.load_training_state(state, directory, self.dist, allow_unsafe=unsafe)
        return state

    def load_model_weights(self, state, directory: str) -> None:
        unsafe = bool(getattr(self.args, "allow_unsafe_checkpoint_load", False))
        state_io.load_model_weights(self.model, directory, self.dist, allow_unsafe=unsafe)

    def export_model(self, state, directory: str) -> None:
        state_io.save_model_weights(self.model, directory, self.dist)

    def finalize(self, state) -> nn.Module:
        return self.model

    def barrier(self) -> None:
        distributed.barrier(self.dist)

    def preemption_requested(self, step: int, local_flag: bool) -> bool:
        # This process's SIGTERM flag: schedulers signal every rank, and a collective here would
        # cost a host round trip per step.
        return local_flag


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


def _current_lr(scheduler, optimizer) -> float:
    if hasattr(scheduler, "get_last_lr"):
        return float(scheduler.get_last_lr()[0])
    return float(optimizer.param_groups[0]["lr"])


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
