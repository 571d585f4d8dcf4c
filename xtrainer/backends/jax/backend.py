"""The JAX backend: jitted SPMD steps over a data/fsdp/tensor mesh, optax, orbax.

Each train step is one ahead-of-time compiled executable per input signature: the state is
donated, shardings are explicit, and a new signature (e.g. a smaller last batch) is compiled once
with a warning that names what changed. Metrics stay on device; the front reads them at log time.
"""

from __future__ import annotations

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
from ...schedules import plateau_from_args, plateau_update, schedule_from_args
from ...sharding import BATCH_AXES, MeshConfig, parse_sharding_rules, param_spec
from ..base import EvalOutput, StepMetrics
from . import multihost, state_io
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
        self._scalar_cache: dict = {}  # host scalar bytes -> replicated device array (see _replicate)

    # ------------------------------------------------------------------ setup

    def prepare(self, model: Any, args: Any, *, compute_loss_func: Any = None) -> Any:
        multihost.initialize_from_env()
        if getattr(args, "jax_compilation_cache_dir", None):
            jax.config.update("jax_compilation_cache_dir", args.jax_compilation_cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        self.args = args
        self.compute_loss_func = compute_loss_func
        devices = self.devices or jax.devices()
        self.model = model
        self.adapter = make_adapter(model, seed=args.seed)
        mesh_spec = args.mesh
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
        if self.mesh_config.batch_devices % self.num_processes:
            raise ValueError(
                f"The batch axes (data x fsdp = {self.mesh_config.batch_devices}) must split evenly over "
                f"{self.num_processes} processes; change args.mesh."
            )
        self.local_batch_devices = self.mesh_config.batch_devices // self.num_processes
        rules = parse_sharding_rules(args.sharding_rules)
        logical = self.adapter.logical_axes()
        self.param_shardings = jax.tree_util.tree_map_with_path(
            lambda path, x: NamedSharding(
                self.mesh,
                PartitionSpec(*param_spec(_path_str(path), np.shape(x), self.mesh_config, rules, logical.get(_path_str(path)))),
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
        return [n for n in names if "label" in n] or ["labels"]

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
            remat=bool(args.activation_checkpointing),
            nan_policy=getattr(args, "nan_policy", "ignore"),
        )

    def init_state(self, num_training_steps: int, optimizers: tuple = (None, None)) -> dict:
        self.config = self._step_config(num_training_steps)
        self.tx = optimizers[0] if optimizers[0] is not None else build_optimizer(self.args)
        opt_state = self._init_opt_state(self.params)
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
            lambda x: x.sharding if getattr(x, "sharding", None) is not None and x.sharding.device_set == set(self.mesh.devices.flat) else self.replicated,
            state,
        )
        state = self._globalize(state, self.state_shardings)
        self._host_step = 0
        self._compiled = {}
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

            compiled = compile_within_memory(self, jitted, state, arrays, mask, num_items)
        else:
            compiled = jitted.lower(state, arrays, mask, num_items).compile()
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
        fn = make_train_step(self.adapter, self.tx, self.config, self.compute_loss_func, with_num_items=with_items)
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
        key = (has_labels, with_items)
        fn = self._eval_fns.get(key)
        if fn is None:
            config = getattr(self, "config", None) or StepConfig(learning_rate=0.0, schedule=lambda s: 1.0,
                                                                  compute_dtype=self.compute_dtype)
            fn = jax.jit(under_mesh(make_eval_step(self.adapter, config, self.compute_loss_func, has_labels, with_items),
                                    self.mesh))
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


def has_abstract_leaves(tree) -> bool:
    """Whether any leaf is a jax.ShapeDtypeStruct (a model built without weights)."""
    return any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(tree))


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
