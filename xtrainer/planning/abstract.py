"""The JAX backend's own train step, lowered with abstract arrays on a TPU topology's devices.

`PlanningBackend` is the JAX backend with two differences: its mesh is built over the devices of a
topology that is not here (libtpu describes them), and every array it would place on a device is a
`jax.ShapeDtypeStruct` carrying its `NamedSharding` instead. `prepare`, `init_state`, the parameter
sharding rules and `jit_train_step` are the backend's own, so what is compiled here is what
`Trainer.train()` compiles on the pod. No parameter is materialised when the model itself is
abstract (`nnx.eval_shape`, or a torch module on the meta device).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ..backends.jax.backend import JaxBackend

# Host dtypes as JAX holds them with 64-bit types disabled (its default).
_JAX_DTYPES = {np.dtype(np.int64): np.dtype(np.int32), np.dtype(np.float64): np.dtype(np.float32),
               np.dtype(np.uint64): np.dtype(np.uint32)}


class PlanningBackend(JaxBackend):
    """A JaxBackend over `devices` (e.g. a TPU topology's) whose state is abstract (see module docstring)."""

    def _globalize_leaf(self, x, sharding):
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=sharding)

    def _init_opt_state(self, params):
        # The same shardings train() gives the optimizer state (JaxBackend._opt_state_shardings).
        shapes = jax.eval_shape(self.tx.init, params)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self._opt_state_shardings(params))

    def abstract_window(self, example: Mapping[str, Any], rows: int) -> tuple[dict, Any, Any]:
        """(window, mask, num_items) as `shard_window` makes them, abstract, for `rows` rows per micro-batch.

        Args:
            example: name -> (dtype, trailing shape) of one host micro-batch's arrays.
            rows: rows of one micro-batch on all processes together (per-device batch x batch devices).
        """
        accumulation = self.args.gradient_accumulation_steps
        window = {}
        for name, (dtype, trailing) in example.items():
            host = np.dtype(dtype)
            shape = (accumulation, rows) + tuple(trailing)
            sharding = self._batch_sharding(_Shaped(shape), 1)
            window[name] = jax.ShapeDtypeStruct(shape, _JAX_DTYPES.get(host, host), sharding=sharding)
        mask = jax.ShapeDtypeStruct((accumulation,), jnp.float32, sharding=self.replicated)
        num_items = jax.ShapeDtypeStruct((), jnp.float32, sharding=self.replicated)
        return window, mask, num_items


class _Shaped:
    """Just what JaxBackend._batch_sharding reads from a host array."""

    def __init__(self, shape):
        self.shape, self.ndim = tuple(shape), len(shape)


def replicated_spec(sharding) -> bool:
    """Whether a sharding keeps a full copy of the array on every device."""
    if isinstance(sharding, NamedSharding):
        return all(entry is None for entry in sharding.spec)
    return bool(getattr(sharding, "is_fully_replicated", False))


def spec_text(sharding) -> str:
    """PartitionSpec('fsdp', None) -> "('fsdp', None)"; a fully replicated array -> "replicated"."""
    if replicated_spec(sharding):
        return "replicated"
    spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
    return "(" + ", ".join("None" if e is None else repr(e) for e in spec) + ")"


def bytes_per_device(leaf) -> int:
    """Bytes of one device's shard of an abstract array."""
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize if _plain(leaf.dtype) else 8


def _plain(dtype) -> bool:
    try:
        np.dtype(dtype)
        return True
    except TypeError:  # typed PRNG keys
        return False


class DefaultHookOwner:
    """What `TrainerHooks` reads from a Trainer, with the Trainer's default hooks, for `plan(model, args)`
    called without a Trainer: the planned step then computes its loss as an unmodified Trainer would."""

    optimizer_cls_and_kwargs = None
    loss_is_scaled_for_ga = None
    current_gradient_accumulation_steps = 1

    def __init__(self, backend: JaxBackend, args: Any, compute_loss_func=None):
        import types

        self.backend, self.args, self.compute_loss_func = backend, args, compute_loss_func
        self.label_names = list(args.label_names or []) or None  # filled in once the backend is prepared
        epsilon = float(getattr(args, "label_smoothing_factor", 0.0) or 0.0)
        self.label_smoother = types.SimpleNamespace(epsilon=epsilon) if epsilon else None
        self.state = types.SimpleNamespace(global_step=0)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        return self.backend.compute_loss(model, inputs, return_outputs=return_outputs,
                                         num_items_in_batch=num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        return self.backend.training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        return self.backend.prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def _prepare_inputs(self, inputs):
        return self.backend.prepare_inputs(inputs)

    def compute_loss_context_manager(self):
        return self.backend.autocast_context()

    def get_decay_parameter_names(self, model) -> list[str]:
        return self.backend.decay_parameter_names(model)

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        raise TypeError("backend='jax' builds an optax optimizer from args.optim; no torch optimizer class is used.")


def default_hooks(backend: JaxBackend, args: Any, compute_loss_func=None):
    """TrainerHooks of an unmodified Trainer over `backend` (see DefaultHookOwner)."""
    from ..hooks import TrainerHooks

    return TrainerHooks(DefaultHookOwner(backend, args, compute_loss_func))
