"""Optimizer names -> optax transformations, with HF's weight-decay mask and an injectable lr.

The learning rate is an injected hyperparameter that the train step sets every step from the shared
schedule (xtrainer/schedules.py), so the same schedule code drives torch and JAX, and metric-driven
schedules (reduce_lr_on_plateau) can scale it from the host without rebuilding the optimizer.
"""

from __future__ import annotations

import re

import jax
import optax

from ...trainer_utils import OptimizerNames

# The same name patterns as the torch backend: no decay on biases and normalisation parameters.
_NO_DECAY = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)", r"(?:^|\.)ln_")]


def _path_str(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def decay_mask(params):
    """A pytree of bools: True where weight decay applies (not biases, not norm parameters)."""

    def decays(path, leaf):
        name = _path_str(path).lower()
        return getattr(leaf, "ndim", 0) > 0 and not any(p.search(name) for p in _NO_DECAY)

    return jax.tree_util.tree_map_with_path(decays, params)


def _parse_optim_args(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    return dict(item.split("=", 1) for item in text.replace(" ", "").split(",") if item)


def build_optimizer(args, mask=None) -> optax.GradientTransformation:
    """The optax optimizer for args.optim, with `learning_rate` injectable (set by the train step).

    adamw* -> optax.adamw (decoupled decay, as torch.optim.AdamW); sgd/adagrad/rmsprop -> their
    optax forms with coupled L2 decay (as torch's weight_decay); adafactor -> optax.adafactor;
    lion -> optax.lion. `mask` (a pytree of bools like the params, or a function of them) says which
    parameters weight decay applies to; by default not biases nor normalisation weights.
    """
    decay_where = decay_mask if mask is None else mask
    name = OptimizerNames(getattr(args.optim, "value", args.optim))
    wd = args.weight_decay
    extra = _parse_optim_args(getattr(args, "optim_args", None))

    def with_l2(opt_fn):
        def make(learning_rate):
            parts = [optax.add_decayed_weights(wd, mask=decay_where)] if wd else []
            return optax.chain(*parts, opt_fn(learning_rate))

        return make

    if name in (OptimizerNames.ADAMW_TORCH, OptimizerNames.ADAMW_TORCH_FUSED, OptimizerNames.ADAMW):
        def make(learning_rate):
            return optax.adamw(learning_rate, b1=args.adam_beta1, b2=args.adam_beta2, eps=args.adam_epsilon,
                               weight_decay=wd, mask=decay_where)
    elif name is OptimizerNames.SGD:
        momentum = float(extra["momentum"]) if "momentum" in extra else None
        nesterov = extra.get("nesterov", "false").lower() in ("true", "1", "yes")
        make = with_l2(lambda lr: optax.sgd(lr, momentum=momentum, nesterov=nesterov))
    elif name is OptimizerNames.ADAGRAD:
        # torch's defaults: no initial accumulator, eps=1e-10 outside the square root.
        make = with_l2(lambda lr: optax.adagrad(lr, initial_accumulator_value=0.0, eps=float(extra.get("eps", 1e-10))))
    elif name is OptimizerNames.RMSPROP:
        make = with_l2(lambda lr: optax.rmsprop(lr, decay=float(extra.get("alpha", 0.99)), eps=float(extra.get("eps", 1e-8)),
                                               eps_in_sqrt=False, momentum=float(extra["momentum"]) if "momentum" in extra else None))
    elif name is OptimizerNames.ADAFACTOR:
        make = with_l2(lambda lr: optax.adafactor(lr, multiply_by_parameter_scale=False))
    elif name in (OptimizerNames.LION, OptimizerNames.LION_SHORT):
        def make(learning_rate):
            return optax.lion(learning_rate, b1=args.adam_beta1, b2=args.adam_beta2, weight_decay=wd, mask=decay_where)
    else:  # pragma: no cover - OptimizerNames is closed
        raise ValueError(f"optim={name.value!r} has no optax implementation.")
    return optax.inject_hyperparams(make)(learning_rate=args.learning_rate)
