"""The JAX backend: jitted SPMD steps over a data/fsdp/tensor mesh, optax, orbax.

Each train step is one ahead-of-time compiled executable per input signature: the state is
donated, shardings are explicit, and a new signature (e.g. a smaller last batch) is compiled once
with a warning that names what changed. Metrics stay on device; the front reads them at log time.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ...activation_sharding import under_mesh
from ...fsdp_options import spmd_fsdp_plan
from ...hooks import refuse_overrides
from ...schedules import (
    load_metric_schedule,
    metric_schedule_from_args,
    metric_schedule_update,
    save_metric_schedule,
    schedule_from_args,
)
from ...sharding import BATCH_AXES, MeshConfig, parse_sharding_rules, param_spec
from ..base import EvalOutput, StepMetrics
from . import determinism, multihost, neftune, state_io
from .adapters import make_adapter
from .mesh import build_mesh
from . import optim
from .optim import build_optimizer, decay_mask
from .bound_model import BoundModel
from .lr_schedule import LrSchedule
from .step import (StepConfig, default_compute_loss, find_injected_learning_rate, init_nan_counters, make_eval_step,
                   make_train_step)

logger = logging.getLogger(__name__)


# Hooks that need eager control of a step that jax compiles as one program (name -> why, and what to do).
_UNSUPPORTED_HOOKS = {
    "training_step": "the jax backend compiles forward, backward and update as one program, so a training_step "
                     "with its own backward pass cannot run; override compute_loss (traced into the step) instead",
    "compute_loss_context_manager": "a context manager would only run while the step is traced, not at each step; "
                                    "use bf16=True / fp16=True for mixed precision, or put the logic in compute_loss",
    "autocast_smart_context_manager": "autocast is a torch feature; on jax use bf16=True / fp16=True for mixed precision",
    "get_optimizer_cls_and_kwargs": "it returns a torch optimizer class; on jax override create_optimizer to return an "
                                    "optax GradientTransformation",
}


class DeviceInputs(dict):
    """An evaluation batch as a user's prediction_step sees it (a dict of the user's tensors), with the
    host batch it came from."""

    host: Mapping[str, np.ndarray] = {}


class DeviceBatch(NamedTuple):
    """An eval batch on device, with its host labels (labels go back to the host unchanged)."""

    arrays: dict
    host: Mapping[str, np.ndarray]


def _path_str(path) -> str:
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        parts.append(str(name))
    if parts and parts[-1] == "value":  # nnx Variables add a trailing .value
        parts.pop()
    return ".".join(parts)


class JaxBackend:
    """Trains Flax NNX / linen / functional models with jitted SPMD steps (see module docstring)."""

    name = "jax"

    def __init__(self, devices: Sequence | None = None):
        # The devices the mesh is built over: jax.devices() unless given. `xtrainer plan` passes the
        # devices of a TPU topology that is not here, to compile the train step for it ahead of time.
        self.devices = list(devices) if devices is not None else None
        self.num_processes = 1
        self.process_index = 0
        self.local_batch_devices = 1
        self._compiled: dict = {}
        self._eval_fns: dict = {}
        self.compile_seconds: list[float] = []
        self._last_compiled = None  # the train step that ran last (its cost analysis gives step_flops)
        self._in_train = False  # between init_state and finalize (bf16/fp16_full_eval apply outside it)
        self._scalar_cache: dict = {}  # host scalar bytes -> replicated device array (see _replicate)
        self._namespace = None  # multi-host: this backend's keys in the coordination service

    # ------------------------------------------------------------------ setup

    def prepare(self, model: Any, args: Any, *, hooks: Any) -> Any:
        reasons = dict(_UNSUPPORTED_HOOKS)
        if hooks.overrides("create_optimizer"):  # then get_optimizer_cls_and_kwargs is not consulted
            reasons.pop("get_optimizer_cls_and_kwargs")
        refuse_overrides(hooks, "jax", reasons)
        if hooks.explicit_optimizer_cls_and_kwargs is not None:
            optim.check_optimizer_cls_and_kwargs(hooks.explicit_optimizer_cls_and_kwargs)
        multihost.initialize_from_env(args)
        if getattr(args, "jax_compilation_cache_dir", None):
            jax.config.update("jax_compilation_cache_dir", args.jax_compilation_cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        self.args = args
        self.hooks = hooks
        devices = self.devices or jax.devices()
        self.model = model
        with neftune.flax_noise_while_capturing(model, args.neftune_noise_alpha):
            self.adapter = make_adapter(model, seed=args.seed)
        self.neftune = neftune.TorchaxNeftune(model, args.neftune_noise_alpha)
        self.fsdp_plan = spmd_fsdp_plan(args, args.mesh, jax.process_count(), self.name)
        mesh_spec = self.fsdp_plan.mesh
        if getattr(args, "tpu_config", None):
            from ...tpu_presets import check_against_devices, load_preset

            preset = load_preset(args.tpu_config)
            if has_abstract_leaves(self.adapter.params) and len(devices) != preset.devices:
                # A model built without weights can only be planned; trainer.plan() checks the preset.
                logger.info("tpu_config=%r is not checked against these %d devices: the model has no weights "
                            "(it can be planned, not trained).", preset.name, len(devices))
            else:
                if devices[0].platform != "tpu":
                    logger.warning("tpu_config=%r on %s devices: only the device counts are checked.",
                                   preset.name, devices[0].platform)
                hosts = len({d.process_index for d in devices}) if self.devices else jax.process_count()
                check_against_devices(preset, len(devices), hosts)
                if mesh_spec is None:
                    mesh_spec = preset.mesh_dict()
        self.mesh_config = MeshConfig.resolve(mesh_spec, len(devices))
        self.mesh = build_mesh(self.mesh_config, devices)
        self.num_processes, self.process_index = jax.process_count(), jax.process_index()
        if self.num_processes > 1 and self._namespace is None:
            self._namespace = multihost.namespace()
        if self.mesh_config.batch_devices % self.num_processes:
            raise ValueError(
                f"The batch axes (data x fsdp = {self.mesh_config.batch_devices}) must split evenly over "
                f"{self.num_processes} processes; change args.mesh."
            )
        self.local_batch_devices = self.mesh_config.batch_devices // self.num_processes
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self._scalar_cache = {}
        self._single_default_device = self.mesh.devices.size == 1 and self.mesh.devices.flat[0] == jax.devices()[0]
        self._place_params()
        self.compute_dtype = jnp.bfloat16 if args.bf16 else jnp.float16 if args.fp16 else None
        self._host_step = 0
        self._metric_schedule = None  # reduce_lr_on_plateau / greedy state, fed by evaluation metrics
        self.lr_schedule = None  # the run's schedule, set by init_state
        return model

    def _place_params(self) -> None:
        """Shards the adapter's trainable parameters by the mesh and sharding rules; other state is replicated."""
        rules = parse_sharding_rules(self.args.sharding_rules)
        logical = self.adapter.logical_axes()
        self.param_shardings = jax.tree_util.tree_map_with_path(
            lambda path, x: NamedSharding(
                self.mesh,
                PartitionSpec(*param_spec(_path_str(path), np.shape(x), self.mesh_config, rules, logical.get(_path_str(path)),
                                          min_size=self.fsdp_plan.min_num_params)),
            ),
            self.adapter.params,
        )
        self.params = self._globalize(self.adapter.params, self.param_shardings)
        self.extra = self._globalize(self.adapter.extra, self.replicated)

    def model_input_names(self) -> list[str] | None:
        return self.adapter.input_names

    def default_label_names(self) -> list[str]:
        # Models that only return logits still get `labels`: the trainer computes their loss.
        names = self.adapter.input_names or []
        # shift_labels (the reference Llama's) is an alternative to labels, not a column every batch has:
        # counted as a label name, batches without it would be evaluated as unlabelled.
        return [n for n in names if "label" in n and n != "shift_labels"] or ["labels"]

    def counts_label_items(self) -> tuple[bool, bool]:
        shifts = getattr(self.model, "loss_shifts_labels", None)
        if shifts is None and self.adapter.kind == "torchax":  # an HF torch model: ask transformers, as on torch
            from ..torch.backend import _loss_shifts_labels

            shifts = _loss_shifts_labels(self.model)
        if shifts is None:
            shifts = type(self.model).__name__.endswith("ForCausalLM")
        return True, bool(shifts)

    @property
    def model_accepts_loss_kwargs(self) -> bool:
        return bool(self.adapter.accepts_num_items)

    can_return_loss = False

    @property
    def looks_up_token_ids(self) -> bool:
        """Whether input_ids feed an embedding lookup: a torch model's input embeddings (torchax), or a model
        taking input_ids (Flax models index their embedding tables with them)."""
        if self.adapter.kind == "torchax":
            from ..torch.backend import _has_input_embeddings

            return _has_input_embeddings(self.model)
        names = self.adapter.input_names
        return names is not None and "input_ids" in names

    @property
    def is_fsdp_enabled(self) -> bool:
        return self.mesh_config.fsdp > 1

    # ------------------------------------------------------------------ optimizer and schedule

    def wrap_for_training(self) -> Any:
        return self.model  # sharding is the mesh's business: there is no wrapper

    def optimizer_target(self) -> Any:
        return self.model

    def decay_parameter_names(self, model) -> list[str]:
        """Parameter paths (dotted; torch names for torch modules) that weight decay applies to."""
        mask = decay_mask(self.adapter.params)
        flat = jax.tree_util.tree_flatten_with_path(mask)[0]
        return [_path_str(path) for path, decays in flat if decays]

    def create_optimizer(self, model) -> Any:
        """The optax optimizer for args.optim (or the Trainer's `optimizer_cls_and_kwargs=(optax factory, kwargs)`)
        with an injectable learning rate; weight decay follows the (overridable) get_decay_parameter_names."""
        mask = None
        if self.hooks.overrides("get_decay_parameter_names"):
            names = set(self.hooks.get_decay_parameter_names(model))
            mask = jax.tree_util.tree_map_with_path(lambda path, _: _path_str(path) in names, self.adapter.params)
        self._built_optimizer = build_optimizer(self.args, self.hooks.explicit_optimizer_cls_and_kwargs, mask=mask)
        return self._built_optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any) -> LrSchedule:
        args = self.args
        # The peak lr the schedule scales: the one optimizer_cls_and_kwargs names, as its torch kwargs' lr would be.
        explicit = self.hooks.explicit_optimizer_cls_and_kwargs
        peak = dict(explicit[1]).get("learning_rate", args.learning_rate) if explicit is not None else args.learning_rate
        return LrSchedule(peak, schedule_from_args(args, num_training_steps), metric_schedule_from_args(args))

    def _smoothing_shifts_labels(self) -> bool:
        """Whether label smoothing aligns labels as for a causal LM (HF: the model class is a causal LM)."""
        if self.adapter.kind == "torchax":
            from ..torch.backend import _is_causal_lm_class

            return _is_causal_lm_class(self.model)
        return self.counts_label_items()[1]

    def _eval_config(self) -> StepConfig:
        """The eval step's settings: the training ones, with bf16/fp16_full_eval's dtype outside train()
        (transformers casts the model for an evaluate/predict that train() did not start)."""
        config = getattr(self, "config", None) or StepConfig(lr_schedule=_constant_schedule, compute_dtype=self.compute_dtype)
        full_eval = jnp.bfloat16 if self.args.bf16_full_eval else jnp.float16 if self.args.fp16_full_eval else None
        if full_eval is not None and not self._in_train:
            config = dataclasses.replace(config, compute_dtype=full_eval)
        return config

    def init_state(self, num_training_steps: int, optimizer: Any, scheduler: Any) -> dict:
        args = self.args
        self.neftune.attach()
        if not hasattr(optimizer, "init") or not hasattr(optimizer, "update"):
            raise TypeError(
                f"backend='jax' needs an optax GradientTransformation as the optimizer; got {type(optimizer).__name__}. "
                "Pass optimizers=(optax.adamw(...), None) or override create_optimizer to return one."
            )
        if not callable(scheduler):
            raise TypeError(
                f"backend='jax' needs the lr scheduler to be a callable step -> learning rate; got {type(scheduler).__name__}."
            )
        relift = getattr(self.adapter, "relift_if_trainable_set_changed", None)
        if relift is not None and relift():
            # A torch layer frozen (or unfrozen) after Trainer(...): the step differentiates the new set, as
            # torch's optimizer, built in train(), would see it.
            self._place_params()
        self.tx, self.lr_schedule = optimizer, scheduler
        self._metric_schedule = getattr(scheduler, "metric_state", None)
        opt_state = self._init_opt_state(self.params)
        injected = find_injected_learning_rate(opt_state)
        update_scale = None
        if not injected:
            if not isinstance(scheduler, LrSchedule):
                raise ValueError(
                    "This optax optimizer has a fixed learning rate, so the given schedule cannot set it. Build the "
                    "optimizer with an injectable rate, e.g. optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3), "
                    "or put the schedule inside it (optax.adamw(learning_rate=schedule)) and pass optimizers=(tx, None)."
                )
            # transformers' LambdaLR over a user's optimizer: its own rate times the schedule's multiplier.
            update_scale = scheduler.multiplier
            logger.warning(
                "The optax optimizer passed to the Trainer has a fixed learning rate: its updates are scaled by the "
                "lr_scheduler_type=%r multiplier, and the logged learning_rate is that multiplier times "
                "args.learning_rate (%g).", getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
                args.learning_rate,
            )
        self.config = StepConfig(
            lr_schedule=scheduler,
            lr_injected=injected,
            update_scale=update_scale,
            max_grad_norm=args.max_grad_norm,
            compute_dtype=self.compute_dtype,
            loss_scaling=bool(args.fp16),
            remat=bool(args.activation_checkpointing) or self.fsdp_plan.activation_checkpointing,
            nan_policy=getattr(args, "nan_policy", "ignore"),
        )
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": self.params,
            "opt_state": opt_state,
            "extra": self.extra,
            "rng": jax.random.PRNGKey(args.seed),
            "lr_scale": jnp.ones((), jnp.float32),
        }
        if self.config.loss_scaling:
            state["loss_scale"] = jnp.float32(2.0**15)
            state["good_steps"] = jnp.zeros((), jnp.int32)
        if self.config.nan_policy != "ignore":  # this run's non-finite counters (never checkpointed)
            state["nan"] = init_nan_counters()
        self.state_shardings = jax.tree.map(
            lambda x: x.sharding if getattr(x, "sharding", None) is not None and x.sharding.device_set == set(self.mesh.devices.flat) else self.replicated,
            state,
        )
        state = self._globalize(state, self.state_shardings)
        self._host_step = 0
        self._compiled = {}
        self._eval_fns = {}
        self._in_train = True
        return state

    def _init_opt_state(self, params):
        if has_abstract_leaves(params):
            raise ValueError(
                "The model has no weights (it was built abstractly, e.g. with nnx.eval_shape or on the meta device): "
                "trainer.plan() compiles its train step for a TPU preset, but train() needs real weights."
            )
        return jax.jit(self.tx.init, out_shardings=self._opt_state_shardings(params))(params)

    def _opt_state_shardings(self, params):
        """Optimizer moments sharded as their parameters, everything else replicated.

        Left to XLA, the zeros of a fresh moment are replicated on every device (measured: Adam's mu and
        nu of a 7B model took 50 GiB per device on a 64-device FSDP mesh instead of 0.8 GiB). A moment of
        another shape than its parameter (Adafactor's factored row and column statistics) is replicated.
        """
        import optax

        shapes = jax.eval_shape(self.tx.init, params)
        return optax.tree_map_params(
            self.tx, lambda moment, sharding, param: sharding if moment.shape == param.shape else self.replicated,
            shapes, self.param_shardings, params, transform_non_params=lambda _: self.replicated)

    def _learning_rate_at(self, step: int) -> float:
        """The learning rate of `step` on the host (what the logs report); args.learning_rate before a run
        has its schedule (as a torch optimizer's groups hold their initial rate)."""
        schedule = getattr(self, "lr_schedule", None)
        if schedule is None:
            return float(self.args.learning_rate)
        scale = self._metric_schedule.multiplier if self._metric_schedule is not None else 1.0
        return float(schedule(step)) * float(scale)

    def num_trainable_parameters(self) -> int:
        count = getattr(self.adapter, "num_trainable_parameters", None)
        if count is not None:
            return int(count())
        return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(self.params)))

    def end(self) -> None:
        """Leaves jax.distributed (transformers' Trainer.end ends its process group)."""
        if self.num_processes > 1:
            jax.distributed.shutdown()

    def learning_rates(self, optimizer) -> list[float]:
        return [self._learning_rate_at(self._host_step)] * len(self._parameter_groups(optimizer))

    def optimizer_group(self, optimizer, param=None):
        """The weight-decay split the optax mask applies, shown as transformers' two parameter groups (decay,
        no decay) with the current rate. Their `params` are the user's objects: the torch module's
        Parameters for a torch model, the arrays for a Flax model. A user's own optax optimizer is one group."""
        groups = self._parameter_groups(optimizer)
        if param is None:
            return [group["params"] for group in groups]
        for group in groups:
            if any(param is p for p in group["params"]):
                return group
        return None

    def _parameter_groups(self, optimizer) -> list[dict]:
        ours = optimizer is not None and optimizer is getattr(self, "_built_optimizer", None)
        decays = set(self.decay_parameter_names(self.model) if not self.hooks.overrides("get_decay_parameter_names")
                     else self.hooks.get_decay_parameter_names(self.model))
        flat = jax.tree_util.tree_flatten_with_path(self.params)[0]
        if self.adapter.kind == "torchax":
            module = self.adapter.user_model
            named = [(_path_str(path), module.get_parameter(_path_str(path))) for path, _ in flat]
        else:
            named = [(_path_str(path), value) for path, value in flat]
        lr = self._learning_rate_at(self._host_step)
        if not ours:
            return [{"params": [p for _, p in named], "lr": lr}]
        groups = [{"params": [p for n, p in named if n in decays], "weight_decay": self.args.weight_decay, "lr": lr},
                  {"params": [p for n, p in named if n not in decays], "weight_decay": 0.0, "lr": lr}]
        return [group for group in groups if group["params"]]

    # ------------------------------------------------------------------ the Trainer's default hooks

    def autocast_context(self, cache_enabled=True):
        import contextlib

        return contextlib.nullcontext()  # mixed precision is the compute dtype of the compiled step

    def prepare_inputs(self, inputs: Any) -> Any:
        return inputs  # batches are placed on the mesh before the step (shard_window / shard_batch)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if not isinstance(model, BoundModel):
            raise TypeError(
                "On backend='jax', compute_loss runs inside the compiled train/eval step, where `model` is the model "
                "bound to the step's parameters; it cannot be called with a bare model."
            )
        return default_compute_loss(self.adapter, self.hooks, model, inputs, return_outputs, num_items_in_batch,
                                    smoothing_shifts_labels=self._smoothing_shifts_labels())

    def training_step(self, model, inputs, num_items_in_batch=None):
        raise RuntimeError(
            "backend='jax' has no per-micro-batch training_step: forward, backward and update run as one compiled "
            "step inside Trainer.train(); customise the loss with compute_loss."
        )

    # ------------------------------------------------------------------ data placement

    def _globalize(self, tree, shardings):
        """Places host or single-device values (equal on every process) as global arrays.

        One process: a device_put. Several: each process fills only its addressable shards from its
        own copy, since device_put cannot target devices of other hosts.
        """
        if not isinstance(shardings, NamedSharding):
            return jax.tree.map(self._globalize_leaf, tree, shardings)
        return jax.tree.map(lambda x: self._globalize_leaf(x, shardings), tree)

    def _globalize_leaf(self, x, sharding):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):  # a model built without weights stays abstract
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        if self.num_processes == 1:
            return jax.device_put(x, sharding)
        is_key = isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        host = np.asarray(jax.random.key_data(x) if is_key else x)
        spec = tuple(sharding.spec) + (None,) * (host.ndim - len(sharding.spec))
        leaf_sharding = NamedSharding(self.mesh, PartitionSpec(*spec))
        out = jax.make_array_from_callback(host.shape, leaf_sharding, lambda index: host[index])
        return jax.random.wrap_key_data(out, impl=jax.random.key_impl(x)) if is_key else out

    def _replicate(self, value, reuse: bool = False) -> jax.Array:
        """A small host value (the same on every process) as a replicated global array.

        reuse=True: the per-step inputs (accumulation mask, label-token count) mostly repeat, and
        a transfer costs more host time than a lookup, so recent values stay on device. Only for
        arguments the step never donates (a donated cached array would be deleted).
        """
        host = np.asarray(value)
        if not reuse:
            return jax.make_array_from_process_local_data(self.replicated, host)
        key = (host.dtype.str, host.shape, host.tobytes())
        cached = self._scalar_cache.get(key)
        if cached is None:
            cached = jax.make_array_from_process_local_data(self.replicated, host)
            if len(self._scalar_cache) >= 64:
                self._scalar_cache.pop(next(iter(self._scalar_cache)))
            self._scalar_cache[key] = cached
        return cached

    def _batch_sharding(self, array: np.ndarray, leading: int) -> NamedSharding:
        spec = (None,) * leading + (BATCH_AXES,)
        rows = array.shape[leading] if array.ndim > leading else 0
        if self.num_processes == 1 and rows % self.mesh_config.batch_devices:
            # A short last batch that the batch devices cannot split evenly runs replicated.
            spec = ()
        return NamedSharding(self.mesh, PartitionSpec(*spec[: array.ndim]))

    def _place_all(self, arrays: Mapping[str, np.ndarray], leading: int) -> dict:
        """Host arrays -> global arrays sharded along the batch axes."""
        if self._single_default_device:
            # jnp.asarray's transfer path costs ~60 us of host time per array here, device_put's
            # ~150 us; on a one-device mesh its placement is the sharding the step expects.
            return {k: jnp.asarray(v) for k, v in arrays.items()}
        shardings = {k: self._batch_sharding(v, leading) for k, v in arrays.items()}
        if self.num_processes == 1:
            # One batched transfer instead of one call per array.
            placed = jax.device_put(list(arrays.values()), list(shardings.values()))
            return dict(zip(arrays, placed))
        return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in arrays.items()}

    def shard_batch(self, batch: Mapping[str, np.ndarray]) -> DeviceBatch:
        if self.num_processes > 1:  # every process holds the whole eval batch: replicate it
            arrays = {k: jax.make_array_from_process_local_data(self.replicated, np.asarray(v)) for k, v in batch.items()}
        else:
            arrays = self._place_all({k: np.asarray(v) for k, v in batch.items()}, 0)
        return DeviceBatch(arrays, batch)

    def shard_window(self, window: Sequence[Mapping[str, np.ndarray]]):
        ga = self.args.gradient_accumulation_steps
        real = len(window)
        window = _uniform_rows(list(window))
        padded = window + [window[-1]] * (ga - real)  # fixed window length: no recompile for a short last window
        stacked = {k: np.stack([b[k] for b in padded]) for k in window[0]}
        mask = np.array([1.0] * real + [0.0] * (ga - real), dtype=np.float32)
        arrays = self._place_all(stacked, 1)
        return arrays, self._replicate(mask, reuse=True), real

    # ------------------------------------------------------------------ steps

    def _compile_train_step(self, state, arrays, mask, num_items, with_items: bool):
        signature = (tuple((k, v.shape, str(v.dtype)) for k, v in sorted(arrays.items())), with_items)
        compiled = self._compiled.get(signature)
        if compiled is not None:
            return compiled
        jitted = self.jit_train_step({k: v.sharding for k, v in arrays.items()}, with_items)
        start = time.perf_counter()
        if getattr(self.args, "auto_find_batch_size", False):  # a step that does not fit names the batch that does
            from ...planning.fit import compile_within_memory

            compiled = compile_within_memory(self, jitted, state, arrays, mask, num_items,
                                             compiler_options=determinism.compiler_options(self.args))
        else:
            compiled = jitted.lower(state, arrays, mask, num_items).compile(
                compiler_options=determinism.compiler_options(self.args))
        seconds = time.perf_counter() - start
        if self._compiled:
            previous = next(reversed(self._compiled))
            warnings.warn(
                f"Recompiling the JAX train step (compilation #{len(self._compiled) + 1}, {seconds:.1f}s): "
                f"{_describe_change(previous, signature)}. Keep batch shapes static (dataloader_drop_last=True, "
                "padding to a fixed length) to avoid this.",
                RuntimeWarning,
                stacklevel=4,
            )
        else:
            logger.warning("JAX train step compiled in %.2fs (first compilation).", seconds)
        self.compile_seconds.append(seconds)
        self._compiled[signature] = compiled
        return compiled

    def jit_train_step(self, batch_shardings: dict, with_items: bool):
        """The train step exactly as train() compiles it: jitted with its shardings and state donation,
        not yet lowered. `xtrainer plan` lowers the same function with abstract arrays for a TPU topology."""
        fn = make_train_step(self.adapter, self.tx, self.config, self.hooks, with_num_items=with_items)
        return jax.jit(
            under_mesh(fn, self.mesh),  # models keep activations split along the batch (activation_sharding.py)
            in_shardings=(self.state_shardings, batch_shardings, self.replicated, self.replicated),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,),
        )

    def train_step(self, state, window, num_items_in_batch, events):
        arrays, mask, real = window
        with_items = num_items_in_batch is not None
        num_items = self._replicate(np.float32(num_items_in_batch or 0), reuse=True)
        compiled = self._compile_train_step(state, arrays, mask, num_items, with_items)
        self._last_compiled = compiled
        state, metrics = compiled(state, arrays, mask, num_items)
        # The whole step is one program: its callback points follow its (asynchronous) dispatch.
        for _ in range(real - 1):
            events.substep_end()
        events.pre_optimizer_step()
        events.optimizer_step()
        learning_rate = self._learning_rate_at(self._host_step)
        self._host_step += 1
        return state, StepMetrics(loss=metrics["loss"], grad_norm=metrics["grad_norm"], learning_rate=learning_rate,
                                  nonfinite=metrics.get("nan"))

    # ------------------------------------------------------------------ evaluation

    def eval_model(self, state) -> BoundModel:
        """The model prediction_step receives: bound to the current parameters, in evaluation mode."""
        params, extra = (state["params"], state["extra"]) if state is not None else (self.params, self.extra)
        if state is not None and "opt_state" in state and optim.is_schedule_free(state["opt_state"]):
            params = self._schedule_free_eval_params(state)  # optimizer.eval() on torch
        apply = self._eager_apply()
        return BoundModel(self.adapter, params, extra, jax.random.key(0), False, apply=apply)

    def _eager_apply(self):
        # A user's prediction_step calls the model outside any jit: compile its forward once per shape.
        cached = getattr(self, "_jitted_eval_apply", None)
        if cached is None:
            adapter = self.adapter
            cached = self._jitted_eval_apply = jax.jit(
                lambda params, extra, inputs, rng, train: adapter.apply(params, extra, inputs, rng, False),
                static_argnums=(4,),
            )
        return cached

    def eval_inputs(self, batch: DeviceBatch) -> DeviceInputs:
        inputs = DeviceInputs(self.adapter.to_user(dict(batch.arrays)))
        inputs.host = batch.host
        return inputs

    def trim_padding(self, output, batch):
        return output  # evaluation batches are never padded here

    def metrics_view(self, tree: Any) -> Any:
        """Eval outputs as preprocess_logits_for_metrics / batch_eval_metrics receive them: jax arrays for Flax
        models; CPU torch tensors for a torch model (its metrics code is torch code)."""
        if self.adapter.user_is_jax or tree is None:
            return tree
        import torch

        tree = self.adapter.from_user(tree) if _holds_torch(tree) else tree
        return jax.tree.map(lambda x: torch.from_numpy(np.asarray(jax.device_get(x))), tree)

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None, count_items: bool = True):
        """The Trainer's default prediction_step: the compiled eval step on the model's bound parameters."""
        if not isinstance(model, BoundModel):
            raise TypeError("On backend='jax', prediction_step gets the model bound to the current parameters.")
        arrays = self.adapter.from_user(dict(inputs))
        label_names = self.hooks.label_names
        has_labels = bool(label_names) and all(arrays.get(k) is not None for k in label_names)
        counts, shifts = self.counts_label_items()
        if ignore_keys is None:
            config = getattr(self.adapter.user_model, "config", None)
            ignore_keys = list(getattr(config, "keys_to_ignore_at_inference", ["cache"]) or []) if config is not None else []
        config = self._eval_config()
        key = (has_labels, counts and count_items and has_labels, bool(shifts), tuple(ignore_keys), config)
        fn = self._eval_fns.get(key)
        if fn is None:
            # Activations stay split along the batch, as in the train step (activation_sharding.py).
            fn = jax.jit(under_mesh(make_eval_step(self.adapter, config, self.hooks, has_labels=key[0],
                                                   count_items=key[1], shifts_labels=key[2], ignore_keys=key[3]),
                                    self.mesh),
                         compiler_options=determinism.compiler_options(self.args))
            self._eval_fns[key] = fn
        loss, logits = fn(model._xt_params, model._xt_extra, arrays)
        labels = None
        if has_labels:
            found = tuple(arrays[name] for name in label_names)
            labels = found[0] if len(found) == 1 else found
        if prediction_loss_only:
            return EvalOutput(loss, None, None)
        return EvalOutput(loss, logits, labels)

    def generate(self, model, inputs, gen_kwargs: dict) -> Any:
        """Generated ids [batch, len] as HF's `model.generate` returns them (see jax/generation.py)."""
        from .generation import generate_batch

        state = {"params": model._xt_params, "extra": model._xt_extra}
        batch = DeviceBatch(self.adapter.from_user(dict(inputs)), getattr(inputs, "host", {}))
        return generate_batch(self, state, batch, gen_kwargs)

    def step_flops(self) -> float | None:
        from . import flops

        if self._last_compiled is None:
            return None
        cached = getattr(self, "_flops_cache", (None, None))
        if cached[0] is not self._last_compiled:  # one cost analysis per compiled step
            ga, devices = self.args.gradient_accumulation_steps, self.mesh.devices.size
            cached = self._flops_cache = (self._last_compiled, flops.step_flops(self._last_compiled, ga, devices))
        return cached[1]

    def peak_flops(self) -> float | None:
        from . import flops

        return flops.peak_flops(self.mesh.devices.flat)

    def to_host(self, tree: Any) -> Any:
        if not self.adapter.user_is_jax and _holds_torch(tree):  # torch tensors from a user's torch code
            tree = jax.tree.map(_torch_to_host, tree, is_leaf=lambda x: type(x).__module__.startswith("torch"))
        return jax.device_get(tree)

    def repeat_scalar(self, value, times: int):
        return jnp.repeat(jnp.reshape(value, (1,)), times)

    def all_sum(self, value: int) -> int:
        if self.num_processes == 1:
            return value
        from jax.experimental import multihost_utils

        return int(np.sum(multihost_utils.process_allgather(np.int64(value))))

    def _schedule_free_eval_params(self, state):
        """The averaged weights x of a schedule-free optimizer, computed once per state (not per eval batch)."""
        cached = getattr(self, "_eval_params_cache", (None, None))
        if cached[0] is not state["opt_state"]:
            fn = getattr(self, "_eval_params_fn", None) or jax.jit(optim.eval_params)
            self._eval_params_fn = fn
            cached = self._eval_params_cache = (state["opt_state"], fn(state["opt_state"], state["params"]))
        return cached[1]

    def on_eval_metric(self, state, value: float) -> None:
        if self._metric_schedule is None:
            return
        self._metric_schedule = metric_schedule_update(self._metric_schedule, value)
        state["lr_scale"] = self._replicate(np.float32(self._metric_schedule.multiplier))

    # ------------------------------------------------------------------ state I/O

    #: One orbax state holds the weights with the optimizer state; a checkpoint has no separate model files.
    weights_restored_with_state = True

    @property
    def model_files_in_checkpoints(self) -> bool:
        """A torch model (through torchax) also gets its model files in every checkpoint, as transformers writes
        them (model.safetensors, config.json); a Flax model's weights are in the orbax state only."""
        return self.adapter.kind == "torchax"

    def save(self, state, directory: str, *, save_only_model: bool = False) -> None:
        self.save_async(state, directory, save_only_model=save_only_model)()

    def save_async(self, state, directory: str, *, save_only_model: bool = False, outcome_tag: str | None = None,
                   background: bool = True):
        """Starts an orbax save (host copies made before it returns); returns the function that waits for it.

        Orbax always writes from host copies, so `background` changes nothing here.

        Several processes: `outcome_tag` is where checkpoint_writer posts each process's outcome
        with `exchange`; orbax's barriers watch it, so a write that fails on one process stops the
        others' waits at once (multihost.failure_aware_barrier).
        """
        if save_only_model:
            state = {"params": state["params"], "extra": state["extra"]}
        barrier, timeout = None, None
        if self.num_processes > 1:
            timeout = self._peer_timeout()
            if outcome_tag is not None:
                barrier = multihost.failure_aware_barrier(self._key(outcome_tag), _peer_save_failed)
        finish = state_io.start_save(_without_run_counters(state), directory, barrier_sync_fn=barrier, timeout_s=timeout)
        metric_state = self._metric_schedule  # the state at this step, not at the time the write ends
        if metric_state is None or save_only_model or self.process_index != 0:
            return finish

        def finish_with_metric_schedule():
            result = finish()
            save_metric_schedule(metric_state, directory)  # orbax has no slot for this small host state
            return result

        return finish_with_metric_schedule

    def _peer_timeout(self) -> float:
        return float(getattr(self.args, "ddp_timeout", None) or 1800)

    def _key(self, tag: str) -> str:
        return f"{self._namespace}/{tag}"

    def exchange(self, tag: str, value) -> list:
        """Every process's `value` (JSON-able), in process order; may run in a background thread."""
        if self.num_processes == 1:
            return [value]
        return multihost.exchange(self._key(tag), value, self._peer_timeout())

    def forget(self, tag: str) -> None:
        """Drops the exchange keys under `tag` (every process has read them)."""
        if self.num_processes > 1 and self.process_index == 0:
            multihost.forget(self._key(tag))

    def restore(self, state, directory: str, *, include_model: bool = True):
        restored = state_io.restore_state(_without_run_counters(state), directory)
        if not include_model:
            restored["params"], restored["extra"] = state["params"], state["extra"]
        if "nan" in state:  # the non-finite counters belong to this run, not to the checkpoint
            restored["nan"] = state["nan"]
        self._host_step = int(jax.device_get(restored["step"]))
        if self._metric_schedule is not None:
            self._metric_schedule = load_metric_schedule(self._metric_schedule, directory)
        return restored

    def adopt_model_weights(self, state):
        """The state with the weights the user's model object holds now (a user's _load_from_checkpoint
        loaded them into it), placed with the parameters' shardings."""
        params, extra = self.adapter.read_params()
        state = dict(state)
        state["params"] = self._globalize(params, self.param_shardings)
        state["extra"] = self._globalize(extra, self.replicated)
        return state

    def load_model_weights(self, state, directory: str) -> None:
        restored = state_io.restore_state(_without_run_counters(state), directory)
        state["params"], state["extra"] = restored["params"], restored["extra"]

    def model_state_for_save(self, state, copy: bool = False) -> None:
        return None  # the main process reads the (replicated or addressable) weights itself in export_model

    def export_model(self, state, directory: str, state_dict=None) -> None:
        params, extra = (state["params"], state["extra"]) if state is not None else (self.params, self.extra)
        if self.process_index == 0:
            state_io.export_params(self.adapter, params, extra, directory)

    def finalize(self, state) -> Any:
        self._in_train = False
        self.neftune.detach()
        self.params, self.extra = state["params"], state["extra"]
        return self.adapter.write_back(self.params, self.extra)

    @property
    def native_preemption_notice(self) -> bool:
        """True on multi-host runs with JAX's preemption service, which agrees on the step to stop at."""
        return self.num_processes > 1 and multihost.preemption_service_running()

    def announce_preemption(self) -> None:
        """Called by the SIGTERM handler: tells every host's preemption service now (multihost.py)."""
        multihost.announce_preemption()

    def preemption_requested(self, step: int, local_flag: bool, *, final: bool = False) -> bool:
        if self.native_preemption_notice:
            # Every host calls this after every step; once any host got SIGTERM, all of them
            # return True at the same agreed step, so they save the same checkpoint. The sync point
            # is the step after the fastest host's last call, so a notice that comes during the
            # last step is found by asking for the step after it.
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step + 1 if final else step))
        return local_flag

    def barrier(self) -> None:
        if self.num_processes > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("xtrainer")


def has_abstract_leaves(tree) -> bool:
    """Whether any leaf is a jax.ShapeDtypeStruct (a model built without weights)."""
    return any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(tree))


def _constant_schedule(step):
    """The learning rate of an eval-only step config (one function, so equal configs hash equal)."""
    return 0.0


def _torch_to_host(x):
    """A torch tensor (a torchax view of a jax array, or an ordinary CPU tensor) as a host array."""
    if not type(x).__module__.startswith("torch"):
        return x
    try:
        from torchax import interop

        return np.asarray(jax.device_get(interop.jax_view(x)))
    except Exception:  # an ordinary torch tensor
        return x.detach().cpu().numpy()


def _holds_torch(tree) -> bool:
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: type(x).__module__.startswith("torch"))
    return any(type(x).__module__.startswith("torch") for x in leaves)


def _peer_save_failed(rank: int, report: dict) -> Exception:
    from ...checkpoint import PeerSaveFailed

    return PeerSaveFailed(f"process {rank} failed to write its part of the checkpoint: {report.get('error')}")


def _without_run_counters(state: dict) -> dict:
    """The state without the per-run nan_policy counters, so checkpoints do not depend on the policy."""
    return {k: v for k, v in state.items() if k != "nan"}


def _uniform_rows(window: list[dict]) -> list[dict]:
    """Pads a smaller last micro-batch to the window's batch size with label -100 rows (which carry
    no loss), so the window stacks into one array."""
    sizes = {len(next(iter(b.values()))) for b in window}
    if len(sizes) == 1:
        return window
    rows = max(sizes)
    out = []
    for batch in window:
        have = len(next(iter(batch.values())))
        if have == rows:
            out.append(batch)
            continue
        labels = batch.get("labels")
        if labels is None or not np.issubdtype(np.asarray(labels).dtype, np.integer):
            raise ValueError(
                "A short last batch cannot be padded inside a gradient-accumulation window without integer `labels` "
                "(padding rows must carry no loss): set dataloader_drop_last=True."
            )
        padded = {}
        for key, value in batch.items():
            fill = -100 if key == "labels" else 0
            extra = np.full((rows - have,) + value.shape[1:], fill, dtype=value.dtype)
            padded[key] = np.concatenate([value, extra])
        out.append(padded)
    return out


def _describe_change(old, new) -> str:
    old_shapes, new_shapes = dict((k, (s, d)) for k, s, d in old[0]), dict((k, (s, d)) for k, s, d in new[0])
    changes = [f"'{k}' {old_shapes.get(k, ('absent',))[0]} -> {new_shapes.get(k, ('absent',))[0]}"
               for k in sorted(set(old_shapes) | set(new_shapes)) if old_shapes.get(k) != new_shapes.get(k)]
    if old[1] != new[1]:
        changes.append("labels appeared" if new[1] else "labels disappeared")
    return "batch shape changed: " + ", ".join(changes) if changes else "input signature changed"
