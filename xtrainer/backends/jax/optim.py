"""`optim` names -> optax transformations, with transformers' weight-decay grouping and an injectable lr.

Each supported name (the jax column of xtrainer/optimizers.py's table) becomes the optax transformation
that does the update of the library transformers uses for it on torch, with the same TrainingArguments
(adam_beta1/2, adam_epsilon, weight_decay on the decay group only, optim_args). The tests compare each one
with its torch library on the same tensors.

The learning rate is an injected hyperparameter that the train step sets every step from the shared
schedule (xtrainer/schedules.py), so the same schedule code drives torch and JAX, and metric-driven
schedules (reduce_lr_on_plateau, greedy) can scale it from the host without rebuilding the optimizer.
"""

from __future__ import annotations

import logging
import math
import re

import jax
import jax.numpy as jnp
import optax

from ...optimizers import check_optimizer, parse_optim_args
from ...trainer_utils import OptimizerNames

logger = logging.getLogger(__name__)

# The same name patterns as the torch backend: no decay on biases and normalisation parameters.
_NO_DECAY = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)", r"(?:^|\.)ln_")]
O = OptimizerNames


def _path_str(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def decay_mask(params):
    """A pytree of bools: True where weight decay applies (not biases, not norm parameters)."""

    def decays(path, leaf):
        name = _path_str(path).lower()
        return getattr(leaf, "ndim", 0) > 0 and not any(p.search(name) for p in _NO_DECAY)

    return jax.tree_util.tree_map_with_path(decays, params)


class _Options:
    """optim_args as typed values; keys that the chosen optimizer does not read are reported once."""

    def __init__(self, name: str, text: str | None):
        self.name, self.values, self.read = name, parse_optim_args(text), set()

    def get(self, key, default, kind=float):
        self.read.add(key)
        return kind(self.values[key]) if key in self.values else default

    def refuse(self, key, default, why: str) -> None:
        """A torch-side option optax cannot honour: refused unless left at its default."""
        self.read.add(key)
        if key in self.values and float(self.values[key]) != default:
            raise ValueError(f"optim_args {key}={self.values[key]} cannot be honoured by optim='{self.name}' on "
                             f"backend='jax': {why}. Remove it, or use backend='torch'.")

    def report_unread(self) -> None:
        unread = sorted(set(self.values) - self.read)
        if unread:
            logger.warning("optim_args %s are not read by optim='%s' on backend='jax' (as on torch, where "
                           "transformers ignores them too).", unread, self.name)


def _flag(text) -> bool:
    return str(text).lower() in ("true", "1", "yes")


def _with_l2(wd: float, opt, mask):
    """torch's coupled weight decay (SGD, Adagrad, RMSprop): wd * p added to the gradient on the decay group."""
    return optax.chain(optax.add_decayed_weights(wd, mask=mask), opt) if wd else opt


def _warmup(steps):
    """schedulefree's own warmup (transformers passes it args.warmup_steps): (k + 1) / steps while k < steps."""
    if not steps:
        return lambda count: 1.0
    return lambda count: jnp.minimum((count + 1) / steps, 1.0)


def _schedule_free(learning_rate, base_without_lr, b1, wd, warmup_steps, weight_lr_power, mask):
    """Schedule-free wrapping of `base` (decay on the decay group, at y: schedulefree's torch update)."""
    warm = _warmup(warmup_steps)
    lr = lambda count: learning_rate * warm(count)  # noqa: E731 - the injected lr, warmed up as schedulefree does
    base = optax.chain(base_without_lr, optax.add_decayed_weights(wd, mask=mask), optax.scale_by_learning_rate(lr))
    return optax.contrib.schedule_free(base, learning_rate=lr, b1=b1, weight_lr_power=weight_lr_power)


def _ademamix_schedules(alpha, b1, b3, t_alpha, t_beta3):
    """bitsandbytes' AdEMAMix warmups of alpha and beta3 (linear, and linear in the half-life), when asked."""
    alpha_fn, b3_fn = alpha, b3
    if t_alpha:
        alpha_fn = lambda count: jnp.minimum((count + 1) * alpha / t_alpha, alpha)  # noqa: E731
    if t_beta3:
        log_b1, log_b3 = math.log(b1), math.log(b3)

        def b3_fn(count):
            scale = (count + 1) / t_beta3
            return jnp.minimum(jnp.exp(log_b1 * log_b3 / ((1 - scale) * log_b3 + scale * log_b1)), b3)

    return alpha_fn, b3_fn


def _factory(args, mask):
    """optim name -> (make(learning_rate) -> GradientTransformation), reading args and optim_args.

    `mask` says which parameters weight decay applies to (a pytree of bools like the params, or a function of them).
    """
    name = O(getattr(args.optim, "value", args.optim))
    wd, b1, b2, eps = args.weight_decay, args.adam_beta1, args.adam_beta2, args.adam_epsilon
    opts = _Options(name.value, getattr(args, "optim_args", None))

    if name in (O.ADAMW_TORCH, O.ADAMW_TORCH_FUSED, O.ADAMW_TORCH_XLA, O.ADAMW):
        def make(learning_rate):
            return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=mask)
    elif name is O.SGD:
        momentum = opts.get("momentum", 0.0)
        opts.refuse("dampening", 0.0, "optax's momentum has no dampening")
        wd_sgd = opts.get("weight_decay", wd)  # transformers lets optim_args set SGD's default decay
        nesterov = opts.get("nesterov", False, _flag)

        def make(learning_rate):
            return _with_l2(wd_sgd, optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov), mask)
    elif name is O.ADAGRAD:
        opts.refuse("lr_decay", 0.0, "optax's adagrad has no lr_decay (use a lr_scheduler_type instead)")
        eps_ada = opts.get("eps", 1e-10)

        def make(learning_rate):
            return _with_l2(wd, optax.adagrad(learning_rate, initial_accumulator_value=0.0, eps=eps_ada), mask)
    elif name in (O.RMSPROP, O.RMSPROP_BNB, O.RMSPROP_32BIT):
        alpha, eps_rms = opts.get("alpha", 0.99), opts.get("eps", 1e-8)
        momentum, centered = opts.get("momentum", 0.0), opts.get("centered", False, _flag)

        def make(learning_rate):
            # torch's order: the momentum buffer sums unscaled steps and the lr applies after it (optax.rmsprop
            # scales first, which differs as soon as the lr changes).
            scale = optax.scale_by_stddev if centered else optax.scale_by_rms
            parts = [scale(decay=alpha, eps=eps_rms, eps_in_sqrt=False)]
            if momentum:
                parts.append(optax.trace(decay=momentum))
            return _with_l2(wd, optax.chain(*parts, optax.scale_by_learning_rate(learning_rate)), mask)
    elif name is O.ADAFACTOR:
        def make(learning_rate):
            # transformers' Adafactor(scale_parameter=False, relative_step=False): every matrix factored, the
            # update clipped to RMS 1, and decoupled decay scaled by the lr (p -= lr * wd * p).
            return optax.adafactor(learning_rate, min_dim_size_to_factor=1, multiply_by_parameter_scale=False,
                                   clipping_threshold=1.0, decay_rate=0.8, eps=1e-30,
                                   weight_decay_rate=(wd * learning_rate) if wd else None, weight_decay_mask=mask)
    elif name in (O.LION, O.LION_SHORT):
        def make(learning_rate):
            return optax.lion(learning_rate, b1=b1, b2=b2, weight_decay=wd, mask=mask)
    elif name is O.ADEMAMIX:
        beta1, beta2 = opts.get("beta1", b1), opts.get("beta2", b2)
        alpha, beta3 = opts.get("alpha", 5.0), opts.get("beta3", 0.9999)
        alpha_fn, b3_fn = _ademamix_schedules(alpha, beta1, beta3, opts.get("t_alpha", None, int),
                                              opts.get("t_beta3", None, int))
        eps_ade = opts.get("eps", eps)

        def make(learning_rate):
            return optax.contrib.ademamix(learning_rate, b1=beta1, b2=beta2, b3=b3_fn, alpha=alpha_fn, eps=eps_ade,
                                          weight_decay=wd, mask=mask)
    elif name in (O.SCHEDULE_FREE_ADAMW, O.SCHEDULE_FREE_SGD):
        opts.refuse("r", 0.0, "optax's schedule-free averaging has no polynomial weighting r")
        power = opts.get("weight_lr_power", 2.0)
        if name is O.SCHEDULE_FREE_ADAMW:
            base, beta = optax.scale_by_adam(b1=0.0, b2=b2, eps=eps), b1  # Adam's second moment, no momentum
        else:
            base, beta = optax.identity(), 0.9  # schedulefree's SGD momentum default (transformers sets none)

        def make(learning_rate):
            return _schedule_free(learning_rate, base, beta, wd, args.warmup_steps, power, mask)
    else:  # check_optimizer refused every other name before
        raise AssertionError(name)
    opts.report_unread()
    return make


def build_optimizer(args, optimizer_cls_and_kwargs=None, mask=None) -> optax.GradientTransformation:
    """The optax optimizer of a run, with `learning_rate` injectable (the train step sets it every step).

    Args:
        args: TrainingArguments (optim, optim_args, learning_rate, adam_*, weight_decay, warmup_steps).
        optimizer_cls_and_kwargs: the Trainer's `optimizer_cls_and_kwargs`; on jax `(optax factory, kwargs)`,
            e.g. `(optax.adamw, {"b1": 0.9})`, built as `optax.inject_hyperparams(factory)(learning_rate=...,
            **kwargs)`. A torch optimizer class is refused.
        mask: which parameters weight decay applies to (a pytree of bools like the params, or a function of
            them); None: not biases nor normalisation weights (`decay_mask`).

    Returns:
        An `optax.GradientTransformation` whose state has `hyperparams["learning_rate"]`.

    Raises:
        ValueError: an optim value that cannot run on jax (the message lists those that can), an optim_args
            option optax cannot honour.
        TypeError: a torch class in optimizer_cls_and_kwargs.
    """
    if optimizer_cls_and_kwargs is not None:
        check_optimizer_cls_and_kwargs(optimizer_cls_and_kwargs)
        factory, kwargs = optimizer_cls_and_kwargs
        kwargs = dict(kwargs)
        kwargs.setdefault("learning_rate", args.learning_rate)
        return optax.inject_hyperparams(factory)(**kwargs)
    check_optimizer(args.optim, "jax")
    return optax.inject_hyperparams(_factory(args, decay_mask if mask is None else mask))(learning_rate=args.learning_rate)


def check_optimizer_cls_and_kwargs(optimizer_cls_and_kwargs) -> None:
    """Refuses a torch optimizer class in `optimizer_cls_and_kwargs` on jax, naming what works instead."""
    factory = optimizer_cls_and_kwargs[0]
    if _is_torch_class(factory):
        raise TypeError(
            f"optimizer_cls_and_kwargs holds the torch optimizer {factory.__name__}, which cannot run on "
            "backend='jax'. Pass an optax factory and its kwargs, e.g. (optax.adamw, {'b1': 0.9}), or "
            "optimizers=(an optax GradientTransformation, None), or set args.optim."
        )


def _is_torch_class(obj) -> bool:
    return isinstance(obj, type) and any(c.__module__.startswith("torch") for c in obj.__mro__)


def eval_params(opt_state, params):
    """The weights to evaluate: the schedule-free average x for schedule-free optimizers, else `params`.

    transformers' Trainer switches a schedule-free optimizer to its averaged weights before evaluating
    (`optimizer.eval()`); on jax the state keeps y and z, and x is computed from them here.
    """
    inner = getattr(opt_state, "inner_state", opt_state)
    if hasattr(inner, "z") and hasattr(inner, "b1"):
        return optax.contrib.schedule_free_eval_params(inner, params)
    return params


def is_schedule_free(opt_state) -> bool:
    inner = getattr(opt_state, "inner_state", opt_state)
    return hasattr(inner, "z") and hasattr(inner, "b1")
