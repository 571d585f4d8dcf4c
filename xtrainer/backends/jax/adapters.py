"""One interface over the JAX model kinds: Flax NNX modules, linen modules, pure functions.

An adapter splits a model into trainable `params` and other state `extra` (RNG streams, batch
statistics), and applies it as a pure function: (params, extra, inputs, rng, train) ->
(outputs, new extra). Nothing here holds device state between calls.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from typing import Any

import jax

from ...model_wrappers import FunctionalModel, LinenModel


def _signature(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _input_names(fn) -> tuple[list[str] | None, bool, set[str]]:
    """(named inputs or None when **kwargs, accepts num_items_in_batch, mode keywords)."""
    sig = _signature(fn)
    if sig is None:
        return None, False, set()
    params = sig.parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = [n for n, p in params.items() if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    modes = {n for n in ("deterministic", "train", "training", "rngs") if n in params}
    return (None if var_kw else names), ("num_items_in_batch" in params or var_kw), modes


def _mode_kwargs(modes: set[str], train: bool) -> dict:
    kwargs = {}
    if "deterministic" in modes:
        kwargs["deterministic"] = not train
    if "train" in modes:
        kwargs["train"] = train
    if "training" in modes:
        kwargs["training"] = train
    return kwargs


class JaxUserView:
    """Adapters whose users work in jax arrays: hooks see the same arrays the step uses."""

    user_is_jax = True

    def to_user(self, tree):
        return tree

    def from_user(self, tree):
        return tree

    def user_context(self):
        return contextlib.nullcontext()


def _select(inputs: Mapping, names: list[str] | None) -> dict:
    if names is None:
        return dict(inputs)
    return {k: v for k, v in inputs.items() if k in names}


class NnxAdapter(JaxUserView):
    """A flax.nnx.Module: params are its nnx.Param variables; extra is everything else (RNG counts...)."""

    kind = "nnx"

    def __init__(self, model):
        from flax import nnx

        self.nnx = nnx
        self.model = model
        names, self.accepts_num_items, self.modes = _input_names(type(model).__call__)
        self.input_names = [n for n in names if n != "self"] if names is not None else None
        self.graphdef, self.variables, extra = nnx.split(model, nnx.Param, ...)
        # The train state holds plain arrays, not nnx Variables: every Variable is a pytree node
        # whose flatten/unflatten runs in Python on each compiled call (~8 us each; 65 of them cost
        # the tiny benchmark Llama ~0.5 ms per step). `variables` keeps the metadata (logical axes).
        self.params, self.extra = _pure_dict(self.variables), _pure_dict(extra)
        # Train and eval modes differ in static attributes (Dropout.deterministic), so each mode
        # has its own graph definition.
        self.graphdefs = {}
        for train in (True, False):
            _set_mode(model, train)
            self.graphdefs[train] = nnx.split(model, nnx.Param, ...)[0]
        _set_mode(model, True)

    def apply(self, params, extra, inputs: Mapping, rng, train: bool):
        nnx = self.nnx
        # merge builds fresh Variables from the arrays, tied to the current trace level, so NNX
        # lets the model update its RNG counts under jit/grad/scan.
        module = nnx.merge(self.graphdefs[train], params, extra)
        kwargs = _select(inputs, self.input_names)
        kwargs.update(_mode_kwargs(self.modes, train))
        if "rngs" in self.modes:
            kwargs["rngs"] = nnx.Rngs(dropout=rng)
        outputs = module(**kwargs)
        return outputs, _pure_dict(nnx.split(module, nnx.Param, ...)[2])

    def logical_axes(self) -> dict[str, tuple | None]:
        """path -> logical axis names from nnx.with_partitioning metadata (flax 0.11 and 0.12 spellings)."""
        out = {}
        for path, variable in _flat_variables(self.variables):
            meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
            names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
            out[path] = tuple(names) if names else None
        return out

    def write_back(self, params, extra) -> Any:
        self.nnx.update(self.model, params, extra)
        return self.model

    @property
    def user_model(self):
        return self.model

    def read_params(self):
        """(params, extra) as the model object holds them now (after a user loaded weights into it)."""
        _, variables, extra = self.nnx.split(self.model, self.nnx.Param, ...)
        return _pure_dict(variables), _pure_dict(extra)


def _pure_dict(state) -> dict:
    """An nnx State as nested dicts of arrays (flax 0.12 has nnx.to_pure_dict, 0.11 State.to_pure_dict)."""
    from flax import nnx

    to_pure = getattr(nnx, "to_pure_dict", None)
    return to_pure(state) if to_pure is not None else state.to_pure_dict()


def _set_mode(model, train: bool) -> None:
    method = getattr(model, "train" if train else "eval", None)
    if callable(method):
        method()


def _path_str(path) -> str:
    parts = []
    for key in path:
        key = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        parts.append(str(key))
    return ".".join(parts)


def _flat_variables(state):
    """(dotted path, variable) pairs of an nnx State."""
    from flax import nnx

    flat = nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else state.flat_state()
    return [(".".join(str(k) for k in path), var) for path, var in flat]


class LinenAdapter(JaxUserView):
    """A flax.linen Module with its variables: params are variables["params"], extra the rest."""

    kind = "linen"

    def __init__(self, wrapped: LinenModel):
        self.wrapped = wrapped
        fn = getattr(wrapped.module, wrapped.method) if wrapped.method else wrapped.module.__call__
        self.input_names, self.accepts_num_items, self.modes = _input_names(fn)
        variables = dict(wrapped.variables)
        if "params" not in variables:
            raise ValueError("LinenModel.variables must contain a 'params' collection (module.init(...) output).")
        self.params = variables.pop("params")
        self.extra = variables

    def apply(self, params, extra, inputs: Mapping, rng, train: bool):
        kwargs = _select(inputs, self.input_names)
        kwargs.update(_mode_kwargs(self.modes - {"rngs"}, train))
        mutable = [k for k in extra] if train and extra else False
        method = self.wrapped.method or "__call__"
        result = self.wrapped.module.apply(
            {"params": params, **extra}, **kwargs, rngs={"dropout": rng}, mutable=mutable, method=method
        )
        if mutable:
            outputs, updates = result
            return outputs, {**extra, **updates}
        return result, extra

    def logical_axes(self) -> dict[str, tuple | None]:
        from flax.core import meta

        out = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(self.params, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))[0]:
            out[_path_str(path)] = tuple(leaf.names) if isinstance(leaf, meta.Partitioned) else None
        return out

    def write_back(self, params, extra) -> Any:
        self.wrapped.variables = {"params": params, **extra}
        return self.wrapped

    @property
    def user_model(self):
        return self.wrapped.module

    def read_params(self):
        variables = dict(self.wrapped.variables)
        return variables.pop("params"), variables


class FunctionalAdapter(JaxUserView):
    """A FunctionalModel: params from init_fn (or given), no extra state."""

    kind = "functional"

    def __init__(self, wrapped: FunctionalModel, seed: int):
        self.wrapped = wrapped
        if wrapped.params is None:
            if wrapped.init_fn is None:
                raise ValueError("FunctionalModel needs `params` or an `init_fn` to create them.")
            wrapped.params = wrapped.init_fn(jax.random.key(seed))
        self.params, self.extra = wrapped.params, {}
        self.input_names = wrapped.input_names
        self.accepts_num_items = False
        self.modes = set()

    def apply(self, params, extra, inputs: Mapping, rng, train: bool):
        return self.wrapped.apply_fn(params, _select(inputs, self.input_names), rng=rng, train=train), extra

    def logical_axes(self) -> dict[str, tuple | None]:
        return {}

    def write_back(self, params, extra) -> Any:
        self.wrapped.params = params
        return self.wrapped

    @property
    def user_model(self):
        return self.wrapped

    def read_params(self):
        return self.wrapped.params, {}


def make_adapter(model, seed: int = 0):
    """The adapter for a model, or a TypeError naming what the JAX backend accepts."""
    if isinstance(model, LinenModel):
        return LinenAdapter(model)
    if isinstance(model, FunctionalModel):
        return FunctionalAdapter(model, seed)
    if any(k.__module__.startswith("torch.nn") and k.__name__ == "Module" for k in type(model).__mro__):
        from .torchax_bridge import TorchaxAdapter

        return TorchaxAdapter(model)
    try:
        from flax import nnx
    except ImportError as exc:
        raise ImportError("backend='jax' needs flax: pip install 'xtrainer[jax]'.") from exc
    if isinstance(model, nnx.Module):
        return NnxAdapter(model)
    if type(model).__module__.startswith("flax.linen") or hasattr(model, "init") and hasattr(model, "apply"):
        raise TypeError("A flax.linen Module needs its variables: pass LinenModel(module, variables).")
    raise TypeError(
        f"backend='jax' takes a flax.nnx.Module, LinenModel(module, variables), FunctionalModel(init_fn, apply_fn) "
        f"or a torch.nn.Module (through torchax); "
        f"got {type(model).__name__}."
    )
