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

from ...fsdp_options import spmd_fsdp_plan
from ...schedules import plateau_from_args, plateau_update, schedule_from_args
from ...sharding import BATCH_AXES, MeshConfig, parse_sharding_rules, param_spec
from ..base import EvalOutput, StepMetrics
from . import determinism, multihost, neftune, state_io
from .adapters import make_adapter
from .mesh import build_mesh
from .optim import build_optimizer
from .step import StepConfig, init_nan_counters, make_eval_step, make_train_step

logger = logging.getLogger(__name__)


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

    def __init__(self):
        self.num_processes = 1
        self.process_index = 0
        self.local_batch_devices = 1
        self._compiled: dict = {}
        self._eval_fns: dict = {}
        self.compile_seconds: list[float] = []
        self._last_compiled = None  # the train step that ran last (its cost analysis gives step_flops)
        self._in_train = False  # between init_state and finalize (bf16/fp16_full_eval apply outside it)
        self._scalar_cache: dict = {}  # host scalar bytes -> replicated device array (see _replicate)

    # ------------------------------------------------------------------ setup

    def prepare(self, model: Any, args: Any, *, compute_loss_func: Any = None) -> Any:
        multihost.initialize_from_env()
        if getattr(args, "jax_compilation_cache_dir", None):
            jax.config.update("jax_compilation_cache_dir", args.jax_compilation_cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        self.args = args
        self.compute_loss_func = compute_loss_func
        self.fsdp_plan = spmd_fsdp_plan(args, args.mesh, jax.process_count(), self.name)
        mesh_spec = self.fsdp_plan.mesh
        if getattr(args, "tpu_config", None):
            from ...tpu_presets import check_against_devices, load_preset

            preset = load_preset(args.tpu_config)
            if jax.default_backend() != "tpu":
                logger.warning("tpu_config=%r on %s devices: only the device counts are checked.",
                               preset.name, jax.default_backend())
            check_against_devices(preset, jax.device_count(), jax.process_count())
            if mesh_spec is None:
                mesh_spec = preset.mesh_dict()
        self.mesh_config = MeshConfig.resolve(mesh_spec, jax.device_count())
        self.mesh = build_mesh(self.mesh_config)
        self.num_processes, self.process_index = jax.process_count(), jax.process_index()
        if self.mesh_config.batch_devices % self.num_processes:
            raise ValueError(
                f"The batch axes (data x fsdp = {self.mesh_config.batch_devices}) must split evenly over "
                f"{self.num_processes} processes; change args.mesh."
            )
        self.local_batch_devices = self.mesh_config.batch_devices // self.num_processes
        self.model = model
        with neftune.flax_noise_while_capturing(model, args.neftune_noise_alpha):
            self.adapter = make_adapter(model, seed=args.seed)
        self.neftune = neftune.TorchaxNeftune(model, args.neftune_noise_alpha)
        rules = parse_sharding_rules(args.sharding_rules)
        logical = self.adapter.logical_axes()
        self.param_shardings = jax.tree_util.tree_map_with_path(
            lambda path, x: NamedSharding(
                self.mesh,
                PartitionSpec(*param_spec(_path_str(path), np.shape(x), self.mesh_config, rules, logical.get(_path_str(path)),
                                          min_size=self.fsdp_plan.min_num_params)),
            ),
            self.adapter.params,
        )
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self._scalar_cache = {}
        self._single_default_device = self.mesh.devices.size == 1 and self.mesh.devices.flat[0] == jax.devices()[0]
        self.params = self._globalize(self.adapter.params, self.param_shardings)
        self.extra = self._globalize(self.adapter.extra, self.replicated)
        self.compute_dtype = jnp.bfloat16 if args.bf16 else jnp.float16 if args.fp16 else None
        self._host_step = 0
        self._plateau = None
        return model

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

    def _step_config(self, num_training_steps: int) -> StepConfig:
        args = self.args
        self._plateau = plateau_from_args(args)
        schedule = schedule_from_args(args, num_training_steps)
        return StepConfig(
            learning_rate=args.learning_rate,
            schedule=schedule,
            max_grad_norm=args.max_grad_norm,
            compute_dtype=self.compute_dtype,
            loss_scaling=bool(args.fp16),
            remat=bool(args.activation_checkpointing) or self.fsdp_plan.activation_checkpointing,
            nan_policy=getattr(args, "nan_policy", "ignore"),
            label_smoothing=float(args.label_smoothing_factor or 0.0),
            shift_labels=self._smoothing_shifts_labels(),
        )

    def _smoothing_shifts_labels(self) -> bool:
        """Whether label smoothing aligns labels as for a causal LM (HF: the model class is a causal LM)."""
        if self.adapter.kind == "torchax":
            from ..torch.backend import _is_causal_lm_class

            return _is_causal_lm_class(self.model)
        return self.counts_label_items()[1]

    def _eval_config(self) -> StepConfig:
        """The eval step's settings: the training ones, with bf16/fp16_full_eval's dtype outside train()
        (transformers casts the model for an evaluate/predict that train() did not start)."""
        config = getattr(self, "config", None) or StepConfig(
            learning_rate=0.0, schedule=_constant_schedule, compute_dtype=self.compute_dtype,
            label_smoothing=float(self.args.label_smoothing_factor or 0.0), shift_labels=self._smoothing_shifts_labels(),
        )
        full_eval = jnp.bfloat16 if self.args.bf16_full_eval else jnp.float16 if self.args.fp16_full_eval else None
        if full_eval is not None and not self._in_train:
            config = dataclasses.replace(config, compute_dtype=full_eval)
        return config

    def init_state(self, num_training_steps: int, optimizers: tuple = (None, None)) -> dict:
        self.neftune.attach()
        self.config = self._step_config(num_training_steps)
        self.tx = optimizers[0] if optimizers[0] is not None else build_optimizer(self.args)
        opt_state = jax.jit(self.tx.init)(self.params)  # moment shardings follow the params'
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": self.params,
            "opt_state": opt_state,
            "extra": self.extra,
            "rng": jax.random.PRNGKey(self.args.seed),
            "lr_scale": jnp.ones((), jnp.float32),
        }
        if self.config.loss_scaling:
            state["loss_scale"] = jnp.float32(2.0**15)
            state["good_steps"] = jnp.zeros((), jnp.int32)
        if self.config.nan_policy != "ignore":  # this run's non-finite counters (never checkpointed)
            state["nan"] = init_nan_counters()
        self.state_shardings = jax.tree.map(
            lambda x: x.sharding if isinstance(x, jax.Array) and len(x.sharding.device_set) == len(self.mesh.devices.flat) else self.replicated,
            state,
        )
        state = self._globalize(state, self.state_shardings)
        self._host_step = 0
        self._compiled = {}
        self._in_train = True
        return state

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
        fn = make_train_step(self.adapter, self.tx, self.config, self.compute_loss_func, with_num_items=with_items)
        batch_shardings = {k: v.sharding for k, v in arrays.items()}
        jitted = jax.jit(
            fn,
            in_shardings=(self.state_shardings, batch_shardings, self.replicated, self.replicated),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,),
        )
        start = time.perf_counter()
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
        multiplier = self.config.schedule(self._host_step)
        if self._plateau is not None:
            multiplier = self._plateau.multiplier
        learning_rate = float(self.args.learning_rate * multiplier)
        self._host_step += 1
        return state, StepMetrics(loss=metrics["loss"], grad_norm=metrics["grad_norm"], learning_rate=learning_rate,
                                  nonfinite=metrics.get("nan"))

    def eval_step(self, state, batch, prediction_loss_only, ignore_keys, label_names, num_items_in_batch=None):
        params, extra = (state["params"], state["extra"]) if state is not None else (self.params, self.extra)
        has_labels = bool(label_names) and all(k in batch.arrays for k in label_names)
        with_items = num_items_in_batch is not None and has_labels
        config = self._eval_config()
        key = (has_labels, with_items, config)
        fn = self._eval_fns.get(key)
        if fn is None:
            fn = jax.jit(make_eval_step(self.adapter, config, self.compute_loss_func, has_labels, with_items),
                         compiler_options=determinism.compiler_options(self.args))
            self._eval_fns[key] = fn
        loss, logits = fn(params, extra, batch.arrays, self._replicate(np.float32(num_items_in_batch or 0), reuse=True))
        labels = None
        if has_labels:
            found = tuple(batch.host[name] for name in label_names)
            labels = found[0] if len(found) == 1 else found
        if prediction_loss_only:
            return EvalOutput(loss, None, None)
        return EvalOutput(loss, logits, labels)

    def generate(self, state, batch, gen_kwargs: dict) -> Any:
        """Generated ids [batch, len] as HF's `model.generate` returns them (see jax/generation.py)."""
        from .generation import generate_batch

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
        return jax.device_get(tree)

    def repeat_scalar(self, value, times: int):
        return jnp.repeat(jnp.reshape(value, (1,)), times)

    def all_sum(self, value: int) -> int:
        if self.num_processes == 1:
            return value
        from jax.experimental import multihost_utils

        return int(np.sum(multihost_utils.process_allgather(np.int64(value))))

    def on_eval_metric(self, state, value: float) -> None:
        if self._plateau is None:
            return
        self._plateau = plateau_update(self._plateau, value)
        state["lr_scale"] = self._replicate(np.float32(self._plateau.multiplier))

    # ------------------------------------------------------------------ state I/O

    def save(self, state, directory: str, *, save_only_model: bool = False) -> None:
        if save_only_model:
            state = {"params": state["params"], "extra": state["extra"]}
        state_io.save_state(_without_run_counters(state), directory)

    def restore(self, state, directory: str):
        restored = state_io.restore_state(_without_run_counters(state), directory)
        if "nan" in state:  # the non-finite counters belong to this run, not to the checkpoint
            restored["nan"] = state["nan"]
        self._host_step = int(jax.device_get(restored["step"]))
        return restored

    def load_model_weights(self, state, directory: str) -> None:
        restored = state_io.restore_state(_without_run_counters(state), directory)
        state["params"], state["extra"] = restored["params"], restored["extra"]

    def export_model(self, state, directory: str) -> None:
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
        """True on multi-host runs with JAX's preemption service: it catches SIGTERM itself."""
        return self.num_processes > 1 and multihost.preemption_service_running()

    def preemption_requested(self, step: int, local_flag: bool) -> bool:
        if self.native_preemption_notice:
            # Every host calls this after every step; once any host got SIGTERM, all of them
            # return True at the same agreed step, so they save the same checkpoint.
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return local_flag

    def barrier(self) -> None:
        if self.num_processes > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("xtrainer")


def _constant_schedule(step):
    """The lr multiplier of an eval-only step config (one function, so equal configs hash equal)."""
    return 1.0


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
