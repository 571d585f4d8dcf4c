"""The torch_xla backend: PyTorch modules run as XLA SPMD programs over a (data, fsdp, tensor) mesh.

Design:

- Startup: `prepare` switches torch_xla to SPMD mode before any tensor of the run reaches the device,
  builds an `xs.Mesh` from `args.mesh` with the JAX backend's MeshConfig, and places a copy of the
  model on the device with every parameter sharded by the shared rule language (user
  `sharding_rules`, else the default FSDP rule; xtrainer/sharding.py). The user's model object
  stays an ordinary CPU module: it receives the trained weights at checkpoints and at the end of
  training (`finalize`), so `trainer.model` and `save_model` behave as on the torch backend.
- Inputs: host batches are padded to static shapes (static_shapes.py) and sent to the device
  already sharded on their batch dim over (data, fsdp).
- Steps: the loss, HF num_items semantics, clipping, optimizer and schedule are the torch backend's
  (this class extends TorchBackend). Each optimizer step is bounded by `torch_xla.sync()`: one
  graph per step, plus one per extra micro-batch of an accumulation window (so the graphs do not
  depend on the window length). Nothing in the step reads a device value on the host; the loss and
  grad norm stay on device until the front logs them.
- Recompilation: graphs compiled during train steps are counted with torch_xla's metrics; past
  `xla_max_graphs` a warning (or, with `xla_on_recompile="raise"`, an error) names what changed.
- Checkpoints: the torch backend's file layout (state_io: model.safetensors / save_pretrained,
  optimizer.pt, scheduler.pt, rng_state.pth with HF's extra "xla" seed), so checkpoints move between
  the torch and torch_xla backends and transformers' Trainer.

Options (a TrainingArguments attribute of that name, else the environment variable):
    xla_pad_batches (XTRAINER_XLA_PAD_BATCHES, default true): pad batches to static shapes.
    xla_seq_bucket (XTRAINER_XLA_SEQ_BUCKET, default "pow2"): sequence bucket: "pow2", a multiple, or "none".
    xla_max_graphs (XTRAINER_XLA_MAX_GRAPHS, default 8): train-step graphs compiled before the guard fires.
    xla_on_recompile (XTRAINER_XLA_ON_RECOMPILE, default "warn"): "warn" or "raise" past the limit.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch_xla.core.xla_model as xm
import torch_xla.runtime as xr
from torch import nn

from ...callbacks import TrainerCallback
from ...fsdp_options import spmd_fsdp_plan
from ...sharding import MeshConfig, parse_sharding_rules
from ..base import EvalOutput, StepMetrics
from ..torch import distributed, state_io
from ..torch.backend import (
    TorchBackend,
    TorchState,
    _accepts_loss_kwargs,
    _is_causal_lm_class,
    _loss_shifts_labels,
    watch_underflow_overflow,
)
from ..torch.nan_guard import make_nan_guard
from ..torch.schedulers import current_lr, is_metric_driven
from ..torch.device_cache import CacheEmptier
from ..torch.neftune import Neftune
from . import spmd
from .static_shapes import PadPolicy, Padded, batch_signature, describe_change, pad_batch

logger = logging.getLogger(__name__)


class XlaRecompilationError(RuntimeError):
    """Raised (with xla_on_recompile="raise") when train steps compile more graphs than allowed."""


@dataclass(frozen=True)
class XlaOptions:
    pad_batches: bool = True
    seq_bucket: str | int | None = "pow2"
    max_graphs: int = 8
    on_recompile: str = "warn"

    @classmethod
    def from_args(cls, args) -> XlaOptions:
        def read(name: str):
            value = getattr(args, name, None)
            return value if value is not None else os.environ.get("XTRAINER_" + name.upper())

        pad = read("xla_pad_batches")
        if isinstance(pad, str):
            pad = pad.strip().lower() not in ("0", "false", "no", "off", "")
        bucket = read("xla_seq_bucket")
        if bucket is None:
            bucket = "pow2"
        elif isinstance(bucket, str):
            bucket = bucket.strip().lower()
            bucket = None if bucket in ("none", "0", "false", "off", "") else "pow2" if bucket == "pow2" else int(bucket)
        elif bucket is False or bucket == 0:
            bucket = None
        max_graphs = read("xla_max_graphs")
        mode = str(read("xla_on_recompile") or "warn").strip().lower()
        if mode not in ("warn", "raise"):
            raise ValueError(f"xla_on_recompile must be 'warn' or 'raise', got {mode!r}.")
        return cls(
            pad_batches=True if pad is None else bool(pad),
            seq_bucket=bucket,
            max_graphs=8 if max_graphs is None else int(max_graphs),
            on_recompile=mode,
        )


class DeviceBatch(dict):
    """An evaluation batch on device (a dict of XLA tensors) and how it was padded."""

    padding: Padded | None = None


@dataclass
class DeviceWindow:
    """One accumulation window on device, with the shapes the step graph is specialised on."""

    batches: list[dict[str, torch.Tensor]]
    signature: tuple


@dataclass(frozen=True)
class Repeated:
    """A device scalar repeated `times` times, expanded on the host by `to_host` (no device op)."""

    value: torch.Tensor
    times: int


class _HostOptimizer:
    """An optimizer whose state_dict() is copied to the CPU (what optimizer.pt holds)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def state_dict(self):
        return _tree_to_cpu(self.optimizer.state_dict())


def _tree_to_cpu(tree):
    tensors: list[torch.Tensor] = []

    def collect(x):
        if isinstance(x, torch.Tensor) and x.device.type == "xla":
            tensors.append(x)
        return x

    _map(tree, collect)
    moved = dict(zip(map(id, tensors), spmd.to_cpu(tensors)))
    return _map(tree, lambda x: moved.get(id(x), x) if isinstance(x, torch.Tensor) else x)


def _map(tree, fn):
    if isinstance(tree, Repeated):
        return Repeated(_map(tree.value, fn), tree.times)
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_map(t, fn) for t in tree)
    if isinstance(tree, tuple):  # a NamedTuple
        return type(tree)(*(_map(t, fn) for t in tree))
    if isinstance(tree, Mapping):
        return {k: _map(v, fn) for k, v in tree.items()}
    return fn(tree)


def _backward(loss: torch.Tensor) -> None:
    try:
        loss.backward()
    except RuntimeError as exc:
        if "device_ready_queues_" not in str(exc):
            raise
        raise RuntimeError(
            "backward() on the XLA device failed: this process ran its first backward pass (even one on the CPU) "
            "before torch_xla's runtime had started, so the autograd engine has no queue for XLA devices "
            "(pytorch/xla#4174). Start the runtime first: build the Trainer, or call "
            "torch_xla.runtime.global_runtime_device_count(), before any backward pass in the process."
        ) from exc


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _cut(tree, padding: Padded):
    """Cuts padded rows (and padded sequence positions) off the device outputs of an eval batch."""

    def cut(x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != padding.padded_rows:
            return x
        if padding.padded_rows != padding.rows:
            x = x[: padding.rows]
        if padding.padded_seq != padding.seq and x.dim() >= 2 and x.shape[1] == padding.padded_seq:
            x = x[:, : padding.seq]
        return x

    return _map(tree, cut)


class XlaMetricsReport(TrainerCallback):
    """Prints torch_xla's metrics report (compilations, transfers, execution times) after each evaluation."""

    def on_evaluate(self, args, state, control, **kwargs):
        import torch_xla.debug.metrics as met

        if state.is_world_process_zero:
            print(met.metrics_report(), flush=True)


class TorchXlaBackend(TorchBackend):
    """Trains PyTorch modules with torch_xla SPMD (see the module docstring)."""

    name = "torch_xla"

    def __init__(self):
        super().__init__()
        self.compile_events: list[dict] = []  # one entry per train step that compiled a graph

    # ------------------------------------------------------------------ setup

    def prepare(self, model: nn.Module, args: Any, *, hooks: Any) -> nn.Module:
        if not isinstance(model, nn.Module):
            raise TypeError(f"backend='torch_xla' needs a torch.nn.Module, got {type(model).__name__}.")
        if args.fp16:
            raise ValueError("fp16=True is not supported by backend='torch_xla'; use bf16=True (XLA's native half type).")
        # torch_compile=True has no effect here: xtrainer/args_support.py warns once, with the other such fields.
        spmd.ensure_spmd()
        if xr.process_count() > 1:
            from ..registry import MULTI_HOST_TORCH_ROUTE

            raise NotImplementedError(
                f"backend='torch_xla' runs on one host (one process driving all local devices); this run has "
                f"{xr.process_count()} processes. {MULTI_HOST_TORCH_ROUTE}."
            )
        self.args = args
        self.hooks = hooks
        self._optimizer, self._scaler = None, None
        self.options = XlaOptions.from_args(args)
        self.dist = distributed.DistInfo()
        self.num_processes, self.process_index = 1, 0
        self.fsdp_plan = spmd_fsdp_plan(args, args.mesh, 1, self.name)  # fsdp/fsdp_config -> the mesh
        self.mesh_config = MeshConfig.resolve(self.fsdp_plan.mesh, xr.global_runtime_device_count())
        self.mesh = spmd.build_mesh(self.mesh_config)
        self.local_batch_devices = self.mesh_config.batch_devices
        self.placement = spmd.Placement(self.mesh, self.mesh_config, parse_sharding_rules(args.sharding_rules),
                                        min_size=self.fsdp_plan.min_num_params)
        self.device = self.placement.device
        self.amp_dtype = torch.bfloat16 if args.bf16 else None
        xm.set_rng_state(int(args.seed))  # dropout on the device (HF's set_seed does the same)
        if args.activation_checkpointing or self.fsdp_plan.activation_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                raise ValueError(
                    "activation_checkpointing=True (gradient_checkpointing) needs a model with "
                    f"`gradient_checkpointing_enable()` (transformers models have it); {type(model).__name__} does not."
                )
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.activation_checkpointing_kwargs)
        self.host_model = model
        self.model, self.param_specs = spmd.place_model(model, self.placement)
        watch_underflow_overflow(self.model, args)
        self.accepts_loss_kwargs = _accepts_loss_kwargs(model)
        self.shifts_labels = _loss_shifts_labels(model)
        self.is_causal_lm = _is_causal_lm_class(model)
        self.neftune = Neftune(args.neftune_noise_alpha, model)  # hooks on the device model for each train() run
        # torch_empty_cache_steps: XLA's runtime owns device memory and has no allocator cache to hand back.
        self.cache_emptier = CacheEmptier(None, self.device)
        self.policy = PadPolicy(
            rows=self.options.pad_batches,
            seq_bucket=self.options.seq_bucket if self.options.pad_batches else None,
            max_positions=_max_positions(model),
            causal=self.shifts_labels,
        )
        self._label_keys = list(args.label_names or self.default_label_names())
        return model

    def wrap_for_training(self) -> nn.Module:
        return self.model  # the device copy, sharded over the mesh; there is no further wrapper

    def optimizer_target(self) -> nn.Module:
        return self.model

    def create_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        for group in optimizer.param_groups:
            if group.get("fused"):  # torch's fused kernels have no XLA version; the plain update is the same math
                group["fused"] = False
            # The multi-tensor update traces a third faster than the per-parameter loop (same math).
            if "foreach" in group and group["foreach"] is None:
                group["foreach"] = True
        return optimizer

    def init_state(self, num_training_steps: int, optimizer: Any, scheduler: Any) -> TorchState:
        args = self.args
        self._adopt_optimizer(optimizer)  # one built over the user's CPU model follows the device parameters
        self._graphs = 0
        self._seen: set = set()
        self._last_signature = None
        self._steps = 0
        self.compile_events = []
        self._optimizer = optimizer
        guard = make_nan_guard(args, self.device)
        self._in_train = True  # until finalize (bf16/fp16_full_eval apply to evaluations outside train())
        self.neftune.attach(self.model)
        return TorchState(model=self.model, optimizer=optimizer, scheduler=scheduler, scaler=None, nan_guard=guard)

    def _adopt_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Points a user-built optimizer (over the CPU model's parameters) at the device parameters."""
        device_params = dict(self.model.named_parameters())
        by_host = {id(p): device_params[n] for n, p in self.host_model.named_parameters() if n in device_params}
        device_ids = {id(p) for p in device_params.values()}
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                if id(p) in device_ids:
                    params.append(p)
                elif id(p) in by_host:
                    params.append(by_host[id(p)])
                else:
                    raise ValueError(
                        "The optimizer passed to Trainer(optimizers=...) holds a parameter that is not one of the "
                        "model's; backend='torch_xla' can only move an optimizer built over model.parameters()."
                    )
            group["params"] = params
            if group.get("fused"):  # torch's fused kernels have no XLA version; the plain update is the same math
                group["fused"] = False
        if optimizer.state:
            # A defaultdict(dict), as torch builds it; Adagrad fills it in its constructor already.
            remapped = collections.defaultdict(dict)
            remapped.update({by_host.get(id(p), p): v for p, v in optimizer.state.items()})
            optimizer.state = remapped

    # ------------------------------------------------------------------ data placement

    def shard_batch(self, batch: Mapping[str, np.ndarray]) -> DeviceBatch:
        rows = self.args.per_device_eval_batch_size * self.local_batch_devices
        padded = pad_batch(batch, rows, self.policy, self._label_keys, need_labels=False)
        out = DeviceBatch(self.placement.put_batch(padded.batch))
        out.padding = padded
        return out

    def shard_window(self, window: Sequence[Mapping[str, np.ndarray]]) -> DeviceWindow:
        rows = self.args.per_device_train_batch_size * self.local_batch_devices
        padded = [pad_batch(b, rows, self.policy, self._label_keys) for b in window]
        return DeviceWindow(
            batches=[self.placement.put_batch(p.batch) for p in padded],
            signature=tuple(batch_signature(p.batch) for p in padded),
        )

    # ------------------------------------------------------------------ steps

    def train_step(self, state: TorchState, window: DeviceWindow, num_items_in_batch: int | None, events):
        model, optimizer = state.model, state.optimizer
        self._optimizer = optimizer
        signature = (window.signature, num_items_in_batch is not None, bool(optimizer.state))
        compiled_before = spmd.compile_count()
        num_items = self._num_items_tensor(num_items_in_batch)
        batches = window.batches
        # Shapes only (no device read): the analytic FLOPs of this step, for the `mfu` log.
        self._step_ids_shapes = [tuple(b["input_ids"].shape) for b in batches if "input_ids" in b]
        losses = []
        for i, inputs in enumerate(batches):
            loss = self.hooks.training_step(model, inputs, num_items)  # forward + backward, in the lazy graph
            losses.append(loss.detach().float())
            if i < len(batches) - 1:
                # One graph per micro-batch: the step's graphs do not depend on the window length.
                spmd.sync()
                events.substep_end()
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else float("inf")
        grad_norm = distributed.clip_grad_norm(model, max_norm)
        events.pre_optimizer_step()
        had_state = bool(optimizer.state)
        guard = state.nan_guard
        # In the lazy graph: the update is selected on device, nothing is read back.
        with guard.guarded_step(optimizer, guard.update(losses, grad_norm)) if guard else contextlib.nullcontext():
            optimizer.step()
        if not had_state:  # this step created the optimizer state: lay it out like the parameters
            self._reshard_optimizer(optimizer)
        events.optimizer_step()
        learning_rate = current_lr(state.scheduler, optimizer)
        if not is_metric_driven(state.scheduler):  # ReduceLROnPlateau, GreedyLR...: stepped after evaluation
            state.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.stack(losses)
        spmd.sync()
        self._steps += 1
        self._check_recompilation(spmd.compile_count() - compiled_before, signature)
        nonfinite = guard.report() if guard else None
        return state, StepMetrics(loss=loss, grad_norm=grad_norm, learning_rate=learning_rate, nonfinite=nonfinite)

    def step_flops(self) -> float | None:
        """Analytic FLOPs of the last step (6·params·tokens + attention, see throughput.analytic_train_flops).

        Tokens are the padded input_ids elements the device really computed; None without input_ids.
        """
        from ...throughput import analytic_train_flops

        shapes = getattr(self, "_step_ids_shapes", None)
        if not shapes:
            return None
        config = getattr(self.host_model, "config", None)
        layers, hidden = getattr(config, "num_hidden_layers", 0) or 0, getattr(config, "hidden_size", 0) or 0
        params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return sum(analytic_train_flops(params, int(np.prod(s)), s[-1], layers, hidden) for s in shapes)

    def peak_flops(self) -> float | None:
        from ...throughput import device_peak_flops

        platform = (xr.device_type() or "").lower()
        kind = None
        if platform == "tpu":  # SPMD's virtual device has no kind; the host's accelerator type ("v5p-8") does
            try:
                from torch_xla._internal import tpu

                kind = "TPU " + tpu.get_tpu_type()
            except Exception:  # metadata server unreachable: no table figure (XTRAINER_PEAK_FLOPS still works)
                kind = None
        per_device = device_peak_flops(kind, platform, measure=self._measured_cpu_peak)
        if per_device is None:
            return None
        # The PJRT CPU "devices" share the host's cores: the measured host figure is their total.
        return per_device if platform == "cpu" else per_device * xr.global_runtime_device_count()

    def _measured_cpu_peak(self) -> float:
        """FLOP/s of an XLA matmul run the way the steps run (torch_xla SPMD over all devices): on CPU,
        the stand-in for a datasheet peak. Its rows are split over the devices, which share the cores."""
        cached = getattr(self, "_cpu_peak", None)
        if cached is None:
            import torch_xla.distributed.spmd as xs

            from ...throughput import best_matmul_flops

            size = 1024
            a = torch.ones(size, size, device=xm.xla_device())
            xs.mark_sharding(a, self.mesh, (tuple(self.mesh.axis_names), None))

            def run():
                (a @ a).sum().item()  # .item() waits for the device

            cached = self._cpu_peak = best_matmul_flops(run, size, repeats=5)
        return cached

    def _check_recompilation(self, compiled: int, signature: tuple) -> None:
        """The recompilation guard.

        A train step's graph is fixed by its signature (the window's shapes, whether a label count is
        passed, whether the optimizer state exists yet), so every new signature is a new graph; a
        compilation under a signature seen before means the traced program itself changed. Graphs
        are counted that way (not by compilations, which torch_xla's in-process cache may skip), and
        past `xla_max_graphs` the guard warns or raises with what changed.
        """
        previous, self._last_signature = self._last_signature, signature
        new = signature not in self._seen
        if not new and compiled <= 0:
            return
        if new:
            self._seen.add(signature)
            self._graphs += 1
        else:
            self._graphs += compiled
        cause = describe_change(previous if new else signature, signature)
        self.compile_events.append({"step": self._steps, "compiled": compiled, "cause": cause})
        limit = self.options.max_graphs
        if self._graphs <= limit:
            logger.info("torch_xla train-step graph #%d at step %d: %s.", self._graphs, self._steps, cause)
            return
        message = (
            f"torch_xla traced {self._graphs} different train-step graphs, more than xla_max_graphs={limit}; the "
            f"new one at step {self._steps} came from: {cause}. Each new graph costs a full XLA compilation. Keep "
            "shapes static: leave batch padding on (xla_pad_batches), set dataloader_drop_last=True, or pad "
            "sequences to a fixed length; or raise xla_max_graphs."
        )
        if self.options.on_recompile == "raise":
            raise XlaRecompilationError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def backward(self, loss: torch.Tensor) -> None:
        _backward(loss)

    def extra_callbacks(self) -> list:
        """debug="tpu_metrics_debug": torch_xla's metrics report after every evaluation, as transformers prints it."""
        debug = [getattr(d, "value", d) for d in getattr(self.args, "debug", []) or []]
        return [XlaMetricsReport()] if "tpu_metrics_debug" in debug else []

    def eval_model(self, state) -> nn.Module:
        self._apply_full_eval_dtype()  # bf16/fp16_full_eval outside train()
        return self.model

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None, count_items: bool = True):
        out = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys, count_items=count_items)
        spmd.sync()
        return out

    def trim_padding(self, output: EvalOutput, batch) -> EvalOutput:
        """Cuts the rows and positions that static-shape padding added to an eval batch off its outputs."""
        padding = getattr(batch, "padding", None)
        if padding is None or not padding.changed or (output.logits is None and output.labels is None):
            return output
        out = EvalOutput(output.loss, _cut(output.logits, padding), _cut(output.labels, padding))
        spmd.sync()  # a small graph of slices; the forward graph stays the same for every batch
        return out

    def generate(self, model, batch, gen_kwargs: dict):
        """Static-shape greedy / beam decoding of encoder-decoder models (generation.py): one graph per step
        shape, shared by every step and every batch. Returns CPU ids of the batch's real rows."""
        from .generation import resolve_settings, static_generate

        model = self.model
        if not getattr(getattr(model, "config", None), "is_encoder_decoder", False) or not hasattr(model, "get_encoder"):
            raise ValueError(
                "backend='torch_xla' generates with encoder-decoder models (e.g. T5ForConditionalGeneration) only; "
                f"use backend='torch' to generate with {type(model).__name__}."
            )
        settings = resolve_settings(model, getattr(self.host_model, "generation_config", None), gen_kwargs)
        padding = getattr(batch, "padding", None)
        rows = padding.rows if padding is not None else int(batch["input_ids"].shape[0])
        model.eval()
        with self.autocast_context():
            return static_generate(model, dict(batch), settings, real_rows=rows, sync=spmd.sync, to_cpu=spmd.to_cpu)

    # ------------------------------------------------------------------ host side

    def to_host(self, tree: Any) -> Any:
        tree = _tree_to_cpu(tree)

        def convert(x):
            if isinstance(x, torch.Tensor):
                x = x.detach()
                if x.dtype == torch.bfloat16:
                    x = x.float()
                return x.cpu().numpy()
            return x

        def expand(x):
            if isinstance(x, Repeated):
                return np.repeat(np.reshape(convert(x.value), (1,)), x.times)
            if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
                return type(x)(expand(t) for t in x)
            if isinstance(x, tuple):
                return type(x)(*(expand(t) for t in x))
            if isinstance(x, Mapping):
                return {k: expand(v) for k, v in x.items()}
            return convert(x)

        return expand(tree)

    def repeat_scalar(self, value: torch.Tensor, times: int) -> Repeated:
        return Repeated(value, int(times))

    def all_sum(self, value: int) -> int:
        return value

    def barrier(self) -> None:
        return None

    def preemption_requested(self, step: int, local_flag: bool, *, final: bool = False) -> bool:
        return local_flag  # one process (multi-process runs are refused in prepare)

    # ------------------------------------------------------------------ weights and state I/O

    def _pull_weights(self) -> None:
        """Copies the device model's weights into the user's CPU model (one transfer)."""
        state = self.model.state_dict()
        keys = list(state)
        host = dict(zip(keys, spmd.to_cpu([state[k] for k in keys])))
        self.host_model.load_state_dict(host)

    def _push_weights(self) -> None:
        """Sends the CPU model's weights to the device model, sharded, keeping the parameter objects."""
        spmd.load_into(self.model, self.host_model.state_dict(), self.placement, self.param_specs)

    def _reshard_optimizer(self, optimizer) -> None:
        specs = {id(p): self.param_specs.get(n) for n, p in self.model.named_parameters()}  # no host read
        spmd.shard_optimizer_state(optimizer, self.placement, specs)

    def model_state_for_save(self, state, copy: bool = False) -> None:
        self._pull_weights()  # the user's CPU model gets the device weights; export_model writes it
        return None

    def save(self, state: TorchState, directory: str, *, save_only_model: bool = False) -> None:
        """Optimizer, scheduler and RNG state (the model files are written by the Trainer's `_save`)."""
        if save_only_model:
            return
        host_view = TorchState(model=self.host_model, optimizer=_HostOptimizer(state.optimizer), scheduler=state.scheduler)
        state_io.save_training_state(host_view, directory, self.dist)
        # HF's layout on XLA: rng_state.pth also holds the device RNG seed under "xla".
        rng = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
            "xla": xm.get_rng_state(),
        }
        torch.save(rng, os.path.join(directory, "rng_state.pth"))

    def restore(self, state: TorchState, directory: str, *, include_model: bool = True) -> TorchState:
        if include_model:
            self.load_model_weights(state, directory)
        else:  # the Trainer's _load_from_checkpoint loaded them into the CPU model: send them to the device
            self._push_weights()
        unsafe = bool(getattr(self.args, "allow_unsafe_checkpoint_load", False))
        state_io.load_training_state(state, directory, self.dist, allow_unsafe=unsafe)
        self._reshard_optimizer(state.optimizer)
        rng_path = os.path.join(directory, "rng_state.pth")
        if os.path.isfile(rng_path):
            rng = state_io._load(rng_path, allow_unsafe=unsafe)
            if "xla" in rng:
                xm.set_rng_state(int(rng["xla"]))
        self._last_signature = None
        return state

    def load_model_weights(self, state, directory: str) -> None:
        unsafe = bool(getattr(self.args, "allow_unsafe_checkpoint_load", False))
        state_io.load_model_weights(self.host_model, directory, self.dist, allow_unsafe=unsafe)
        self._push_weights()

    def export_model(self, state, directory: str, state_dict: dict | None = None) -> None:
        state_io.write_model_weights(self.host_model, directory, state_dict)

    def finalize(self, state) -> nn.Module:
        self._in_train = False
        self.neftune.detach()
        self._pull_weights()
        return self.host_model
