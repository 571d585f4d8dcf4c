"""A torch.nn.Module on the JAX backend, through torchax.

The module's trainable parameters become a flat pytree of JAX arrays keyed by their torch names
(so `sharding_rules` and the weight-decay mask use torch names), its buffers are kept apart as
non-trained state, and its forward runs under torchax inside the same jitted step as Flax models.
After training the torch module gets the trained weights back.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TORCHAX_VERSION_HINT = "torchax 0.0.13 works with torch 2.9 (the Colab TPU stack): pip install 'xtrainer[xla]'"


def import_torchax():
    """torchax and its interop module, or an ImportError naming both versions and the fix."""
    import torch

    try:
        import torchax
        from torchax import interop
    except Exception as exc:  # torchax raises assorted errors when it does not match the installed torch
        try:
            from importlib.metadata import version

            torchax_version = version("torchax")
        except Exception:
            torchax_version = "not installed"
        raise ImportError(
            f"Training a torch module with backend='jax' needs torchax, which failed to import "
            f"(torchax {torchax_version}, torch {torch.__version__}): {exc}. {TORCHAX_VERSION_HINT}; "
            "or train it with backend='torch'."
        ) from exc
    return torchax, interop


_JAX_DTYPES = {"torch.float32": jnp.float32, "torch.bfloat16": jnp.bfloat16, "torch.float16": jnp.float16,
               "torch.int64": jnp.int32, "torch.int32": jnp.int32, "torch.bool": jnp.bool_}


def _to_jax(tensor) -> jax.Array:
    if tensor.is_meta:  # a module built on the meta device has no values: it can be planned, not trained
        return jax.ShapeDtypeStruct(tuple(tensor.shape), _JAX_DTYPES.get(str(tensor.dtype), jnp.float32))
    array = tensor.detach().cpu()
    if str(array.dtype) == "torch.bfloat16":
        return jnp.asarray(array.float().numpy(), dtype=jnp.bfloat16)
    return jnp.asarray(array.numpy())


@contextlib.contextmanager
def _prng_key(env, key):
    """Makes torchax draw dropout randomness from `key` (the step's explicit key) for one call."""
    content = getattr(getattr(env, "_property", None), "content", None)
    if content is None:
        yield
        return
    content.append(env.param.override(prng=key))
    try:
        yield
    finally:
        content.pop()


def _outputs_to_jax(outputs, interop) -> Any:
    """HF ModelOutput / dict / tuple / tensor of torchax tensors -> the same structure of JAX arrays."""
    if isinstance(outputs, Mapping):
        return {k: interop.jax_view(v) for k, v in outputs.items() if v is not None and hasattr(v, "shape")}
    if isinstance(outputs, (tuple, list)):
        return tuple(interop.jax_view(v) for v in outputs if v is not None and hasattr(v, "shape"))
    return interop.jax_view(outputs)


class TorchaxAdapter:
    """Adapter (see adapters.py) for a torch.nn.Module, via torchax.interop.JittableModule."""

    kind = "torchax"

    def __init__(self, module):
        torchax, interop = import_torchax()
        self.interop = interop
        self.env = torchax.default_env()
        self.module = module
        # JittableModule keeps one name per tied parameter (e.g. GPT-2's lm_head / wte), and
        # functional_call re-inflates the aliases, so ties survive the round trip.
        # JittableModule puts parameters with requires_grad=False among the buffers: a frozen layer is
        # state the step neither differentiates nor updates, as torch's optimizer never sees it.
        self.params, self.extra = self.read_params()
        signature = inspect.signature(module.forward)
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
        self.input_names = None if var_kw else list(signature.parameters)
        self.accepts_num_items = var_kw or "num_items_in_batch" in signature.parameters
        self.modes = set()

    def apply(self, params, extra, inputs: Mapping, rng, train: bool):
        outputs, extra = self.call_user(params, extra, self.to_user(dict(inputs)), rng, train)
        return _outputs_to_jax(outputs, self.interop), extra

    # ------------------------------------------------------------------ the user's view: torch tensors

    user_is_jax = False

    def call_user(self, params, extra, user_inputs: Mapping, rng, train: bool):
        """Runs forward on torch-tensor inputs (torchax views) and returns the module's own outputs
        (a transformers ModelOutput of torchax tensors), as a user's compute_loss expects."""
        interop = self.interop
        names = self.input_names
        kwargs = {k: v for k, v in user_inputs.items() if names is None or k in names}
        with self.env, _prng_key(self.env, rng):
            self.module.train(train)
            outputs = self.jittable.functional_call("forward", interop.torch_view(params), interop.torch_view(extra), **kwargs)
        return outputs, extra

    def to_user(self, tree):
        """jax arrays -> torch tensors (torchax views, no copy)."""
        return self.interop.torch_view(tree)

    def from_user(self, tree):
        """What a user's torch code returned (tensors, ModelOutputs, tuples, dicts) -> jax arrays."""
        if tree is None:
            return None
        if isinstance(tree, Mapping) or isinstance(tree, (tuple, list)):
            return _outputs_to_jax(tree, self.interop)
        return self.interop.jax_view(tree)

    def user_context(self):
        """torchax's environment: torch operations inside it run as jax operations."""
        return self.env

    @property
    def user_model(self):
        return self.module

    def read_params(self):
        """(params, extra) from the torch module's current tensors (after a user loaded weights into it)."""
        self.jittable = self.interop.JittableModule(self.module)
        return ({name: _to_jax(p) for name, p in self.jittable.params.items()},
                {name: _to_jax(b) for name, b in self.jittable.buffers.items()})

    def logical_axes(self) -> dict:
        return {}

    def num_trainable_parameters(self) -> int:
        """Counted on the torch module now, as transformers does (a layer frozen after Trainer(...) included)."""
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    def relift_if_trainable_set_changed(self) -> bool:
        """Lifts the module again when requires_grad changed since it was lifted (a layer frozen after
        Trainer(...), as transformers scripts do before train()); returns whether it did. The weights are
        the module's current ones: nothing has trained them since, or finalize wrote them back."""
        # Compared by tensor identity: tied parameters have several names, and either may be the one kept.
        now = {id(p) for p in self.module.parameters() if p.requires_grad}
        lifted = {id(self.module.get_parameter(name)) for name in self.params}
        if now == lifted:
            return False
        self.params, self.extra = self.read_params()
        return True

    def write_back(self, params, extra) -> Any:
        import torch

        host = jax.device_get(params)
        with torch.no_grad():
            for name, value in host.items():
                target = self.module.get_parameter(name)
                target.copy_(torch.from_numpy(np.array(value, dtype=np.float32)).to(target.dtype))  # a writable copy
        self.module.train(True)
        return self.module
