"""The model a user's hook receives on the JAX backend: the model bound to given parameters.

On `jax` a subclass's `compute_loss` is traced inside the compiled train step, and its
`prediction_step` runs per evaluation batch. Both get a `BoundModel`: calling it runs the model's
forward on the parameters of the step (or, in evaluation, of the current state), in the user's own
tensor type - jax arrays for Flax models, torch tensors (torchax views of jax arrays) for torch
modules - so transformers-style code (`outputs = model(**inputs)`, `outputs.logits`) works
unchanged. Any other attribute (`model.config`, ...) is the user's model's own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax


class BoundModel:
    """A model bound to (params, extra, rng, train mode).

    Args:
        adapter: the backend's model adapter (backends/jax/adapters.py).
        params, extra: the trainable parameters and other model state to run with.
        rng: the key dropout draws from (each further call in one step folds in a counter).
        train: training mode (dropout on) or evaluation mode.
        apply: the adapter's jax-in/jax-out forward, possibly wrapped in jax.checkpoint (remat).
    """

    def __init__(self, adapter, params, extra, rng, train: bool, apply: Callable | None = None):
        self._xt_adapter = adapter
        self._xt_params = params
        self._xt_extra = extra
        self._xt_rng = rng
        self._xt_train = train
        self._xt_apply = apply or adapter.apply
        self._xt_calls = 0
        #: Set by the backend's default compute_loss: whether its loss is already divided by the window's
        #: label-token count (None when a user's compute_loss did not go through the default).
        self._xt_loss_normalized: bool | None = None

    @property
    def new_extra(self):
        """The model state after the calls made so far (NNX RNG counts, batch statistics)."""
        return self._xt_extra

    def _next_rng(self):
        # The first call uses the step's key itself, so a step that calls the model once draws exactly
        # what it drew before hooks existed; later calls get fresh dropout masks.
        rng = self._xt_rng if self._xt_calls == 0 else jax.random.fold_in(self._xt_rng, self._xt_calls)
        self._xt_calls += 1
        return rng

    def apply_jax(self, inputs: Mapping) -> Any:
        """Forward on jax-array inputs, returning jax outputs (what the backend's own loss uses)."""
        outputs, self._xt_extra = self._xt_apply(self._xt_params, self._xt_extra, dict(inputs), self._next_rng(), self._xt_train)
        return outputs

    def __call__(self, *args, **kwargs):
        if args:
            raise TypeError(
                "On backend='jax' call the model with keyword arguments (model(**inputs)); "
                f"got {len(args)} positional argument(s)."
            )
        adapter = self._xt_adapter
        if adapter.user_is_jax:
            return self.apply_jax(kwargs)
        outputs, self._xt_extra = adapter.call_user(self._xt_params, self._xt_extra, kwargs, self._next_rng(), self._xt_train)
        return outputs

    def __getattr__(self, name: str):
        if name.startswith("_xt_"):
            raise AttributeError(name)
        return getattr(self._xt_adapter.user_model, name)

    def __repr__(self) -> str:
        mode = "train" if self._xt_train else "eval"
        return f"BoundModel({type(self._xt_adapter.user_model).__name__}, {mode})"
