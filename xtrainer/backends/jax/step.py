"""Pure train and eval steps for the JAX backend.

`make_train_step` returns one function `(state, window, weights, num_items) -> (state, metrics)`:
gradient accumulation over the window's leading axis (lax.scan), HF's loss scaling, global-norm
clipping, the shared lr schedule and the optax update, all inside one jitted computation. The
state is a plain dict pytree so orbax can save it as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from .losses import make_label_smoother

_FP16_GROWTH_INTERVAL = 2000  # steps without overflow before the fp16 loss scale doubles


@dataclass(frozen=True)
class StepConfig:
    """Static settings baked into the compiled steps.

    The learning rate of step s is `lr_schedule(s) * lr_scale` (lr_scale: the state's metric-driven
    factor, reduce_lr_on_plateau). With `lr_injected` it is written into the optimizer's injected
    `learning_rate` hyperparameter; otherwise (an optax optimizer with its own fixed rate, passed by the
    user) the optimizer's updates are scaled by `update_scale(s) * lr_scale`, as torch's LambdaLR scales
    an optimizer's own rate.
    """

    lr_schedule: Callable  # step -> learning rate (the Trainer's lr_scheduler on jax)
    lr_injected: bool = True
    update_scale: Callable | None = None  # step -> multiplier of the updates when the lr is not injected
    max_grad_norm: float = 1.0
    compute_dtype: Any = None  # jnp.bfloat16 / jnp.float16 for mixed precision, else None
    loss_scaling: bool = False  # dynamic loss scaling (fp16)
    remat: bool = False  # rematerialise the forward pass in the backward pass
    nan_policy: str = "ignore"  # "skip" / "raise": updates with a non-finite loss or grad norm are not applied


def init_nan_counters() -> dict:
    """The run's non-finite counters (xtrainer/nan_policy.py), kept in the state under "nan"."""
    return {"calls": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32),
            "first_bad": jnp.zeros((), jnp.int32), "metric": jnp.zeros((), jnp.int32)}


def _select_tree(flag, new, old):
    """`new` where flag else `old`, leaf by leaf; typed PRNG keys keep `new` (a key that advanced is harmless)."""
    def pick(a, b):
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return a
        return jnp.where(flag, a, b)

    return jax.tree.map(pick, new, old)


def apply_nan_policy(config: StepConfig, state: dict, new_state: dict, losses, grad_norm) -> dict:
    """Keeps the old params/optimizer state/extra (and fp16 loss scale) when the step is not finite.

    Selected on device with jnp.where, so the step stays one program with no host read. Under fp16
    loss scaling an overflowing gradient with a finite loss is the loss scaler's routine business
    (it already skipped the update and halved the scale); only a non-finite loss counts here, and then
    the scale is left alone, since the overflow was not the scale's fault. A skipped step still
    advances the step counter (and so the lr schedule), as the front's global step does.
    """
    counters = state["nan"]
    loss_ok = jnp.isfinite(jnp.sum(losses))
    finite = loss_ok if config.loss_scaling else loss_ok & jnp.isfinite(grad_norm)
    calls = counters["calls"] + 1
    clean_so_far = counters["first_bad"] == 0
    # "raise" freezes the weights from the first bad step on, so they are clean when the error comes.
    apply = finite & clean_so_far if config.nan_policy == "raise" else finite
    newly_bad = ~finite & clean_so_far
    for key in ("params", "opt_state", "extra"):
        new_state[key] = _select_tree(apply, new_state[key], state[key])
    if config.loss_scaling:
        # A finite loss keeps the loss scaler's own decision (an overflow does not advance the step).
        new_state["step"] = jnp.where(loss_ok, new_state["step"], state["step"] + 1)
        for key in ("loss_scale", "good_steps"):
            new_state[key] = jnp.where(loss_ok, new_state[key], state[key])
    new_state["nan"] = {
        "calls": calls,
        "skipped": counters["skipped"] + (~apply).astype(jnp.int32),
        "first_bad": jnp.where(newly_bad, calls, counters["first_bad"]),
        "metric": jnp.where(newly_bad, jnp.where(loss_ok, 2, 1), counters["metric"]).astype(jnp.int32),
    }
    return new_state


def _global_norm(tree):
    tree_ops = getattr(optax, "tree", None)  # optax.global_norm is deprecated in newer optax
    return tree_ops.norm(tree) if tree_ops is not None and hasattr(tree_ops, "norm") else optax.global_norm(tree)


def _cast_floats(tree, dtype):
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def split_outputs(outputs) -> tuple[Any, Any]:
    """(loss or None, logits or None) from whatever a model returns."""
    if isinstance(outputs, (jax.Array, jnp.ndarray)) or hasattr(outputs, "ndim") and not isinstance(outputs, Mapping):
        return (outputs, None) if outputs.ndim == 0 else (None, outputs)
    if isinstance(outputs, Mapping):
        rest = tuple(v for k, v in outputs.items() if k != "loss" and v is not None)
        return outputs.get("loss"), (rest[0] if len(rest) == 1 else rest or None)
    if hasattr(outputs, "loss") or hasattr(outputs, "logits"):
        return getattr(outputs, "loss", None), getattr(outputs, "logits", None)
    if isinstance(outputs, (tuple, list)) and outputs:
        first = outputs[0]
        if getattr(first, "ndim", None) == 0:
            rest = tuple(outputs[1:])
            return first, (rest[0] if len(rest) == 1 else rest or None)
        return None, (outputs[0] if len(outputs) == 1 else tuple(outputs))
    raise TypeError(f"Cannot read a loss or logits from model outputs of type {type(outputs).__name__}.")


def default_loss(logits, labels, num_items):
    """The trainer's loss when the model returns only logits.

    Integer labels: cross entropy over the last logits axis, ignoring -100, summed and divided by
    num_items (HF's token-count normalisation) or by the count of valid labels. Float labels: MSE.
    """
    if logits is None:
        raise ValueError("The model returned neither a loss nor logits.")
    if isinstance(logits, tuple):
        logits = logits[0]
    if jnp.issubdtype(labels.dtype, jnp.integer):
        valid = labels != -100
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
        total = -jnp.sum(jnp.where(valid, picked, 0.0))
        denom = num_items if num_items is not None else jnp.maximum(valid.sum(), 1)
        return total / denom
    if logits.ndim == labels.ndim + 1 and logits.shape[-1] > 1:
        # Checked while tracing, so the user sees this instead of a broadcasting error from inside jax.
        raise ValueError(
            f"`labels` are {labels.dtype} with shape {labels.shape}, but the model returns class logits of shape "
            f"{logits.shape}: classification needs integer class ids. Cast the label column to int (e.g. "
            "dataset.map(lambda ex: {'labels': int(ex['labels'])})), or return a loss from the model for other targets."
        )
    predictions = logits.astype(jnp.float32)
    if predictions.shape != labels.shape and predictions.shape[-1:] == (1,):
        predictions = predictions[..., 0]
    return jnp.mean((predictions - labels.astype(jnp.float32)) ** 2)


def make_loss_fn(adapter, config: StepConfig, hooks, train: bool, trace_info=None):
    """(params, extra, batch, rng, num_items) -> (loss, (outputs or None, new_extra)).

    The loss comes from the Trainer's (overridable) `compute_loss`, traced here: it gets the model bound
    to `params` and the batch in the user's tensor type (see bound_model.py). In training it is called
    without outputs, in evaluation with `return_outputs=True`, as transformers does.

    `trace_info["normalized"]` records, while tracing, whether the loss is already divided by the
    window's num_items (HF's `loss_is_scaled_for_ga`): then micro-batch losses are summed, otherwise
    they are averaged over the window.
    """
    from .bound_model import BoundModel

    trace_info = {} if trace_info is None else trace_info
    prepares_inputs = hooks.overrides("_prepare_inputs") or hooks.overrides("_prepare_input")

    def loss_fn(params, extra, batch, rng, num_items):
        apply = adapter.apply
        if config.remat and train:
            apply = jax.checkpoint(adapter.apply, static_argnums=(4,))
        model = BoundModel(adapter, _cast_floats(params, config.compute_dtype), extra, rng, train, apply=apply)
        inputs = _cast_floats(dict(batch), config.compute_dtype)
        with adapter.user_context():
            user_inputs = adapter.to_user(inputs)
            if prepares_inputs:
                user_inputs = hooks.prepare_inputs(user_inputs)
            user_items = None if num_items is None else adapter.to_user(num_items)
            if train:
                loss, outputs = hooks.compute_loss(model, user_inputs, num_items_in_batch=user_items), None
            else:
                result = hooks.compute_loss(model, user_inputs, return_outputs=True, num_items_in_batch=user_items)
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise TypeError(
                        "compute_loss(model, inputs, return_outputs=True) must return (loss, outputs); "
                        f"it returned {type(result).__name__}."
                    )
                loss, outputs = result
            loss = _scalar_loss(adapter.from_user(loss))
            outputs = None if outputs is None else adapter.from_user(outputs)
        trace_info["normalized"] = _loss_is_normalized(model, hooks, adapter, num_items)
        return loss, (outputs, model.new_extra)

    return loss_fn


def _scalar_loss(loss):
    loss = jnp.asarray(loss, jnp.float32)
    if loss.ndim and loss.size == 1:
        loss = loss.reshape(())
    if loss.ndim:
        raise ValueError(f"compute_loss must return a scalar loss; it returned an array of shape {loss.shape}.")
    return loss


def _loss_is_normalized(model, hooks, adapter, num_items) -> bool:
    """transformers' loss_is_scaled_for_ga: the user's statement, else what the default loss did, else
    whether the model or compute_loss_func takes num_items_in_batch."""
    stated = hooks.loss_is_scaled_for_ga
    if stated is not None:
        return bool(stated)
    if model._xt_loss_normalized is not None:
        return model._xt_loss_normalized
    return (adapter.accepts_num_items and num_items is not None) or hooks.compute_loss_func is not None


def default_compute_loss(adapter, hooks, model, inputs, return_outputs: bool, num_items_in_batch,
                         smoothing_shifts_labels: bool = False):
    """The Trainer's default compute_loss on jax (traced): the model's own loss, `compute_loss_func`, the
    label-smoothed loss (label_smoothing_factor; causal LMs shift their labels), or cross entropy / MSE on
    the logits (default_loss)."""
    batch = adapter.from_user(dict(inputs))
    num_items = None if num_items_in_batch is None else adapter.from_user(num_items_in_batch)
    labels = batch.get("labels")
    call = dict(batch)
    compute_loss_func = hooks.compute_loss_func
    smoother = make_label_smoother(hooks.label_smoothing_factor, smoothing_shifts_labels)
    if compute_loss_func is None and smoother is not None and labels is not None:
        # As in transformers: the labels go to the smoother, not the model, which so returns only logits.
        call.pop("labels")
        outputs = model.apply_jax(call)
        loss = smoother(outputs, labels, num_items)
        model._xt_loss_normalized = num_items is not None
    elif compute_loss_func is not None:
        call.pop("labels", None)
        with adapter.user_context():  # the function sees the model's own outputs, in the user's tensor type
            user_outputs = model(**adapter.to_user(call))
            loss = compute_loss_func(user_outputs, adapter.to_user(labels), num_items_in_batch=num_items_in_batch)
        loss, outputs = adapter.from_user(loss), adapter.from_user(user_outputs)
        model._xt_loss_normalized = True
    else:
        if adapter.accepts_num_items and num_items is not None:
            call["num_items_in_batch"] = num_items
        outputs = model.apply_jax(call)
        loss, logits = split_outputs(outputs)
        model._xt_loss_normalized = num_items is not None and (loss is None or adapter.accepts_num_items)
        if loss is None:
            if labels is None:
                raise ValueError(
                    "The model did not return a loss and the batch has no `labels`: add a labels column or pass "
                    "`compute_loss_func`."
                )
            loss = default_loss(logits, labels, num_items)
    loss = jnp.asarray(loss, jnp.float32)
    if return_outputs:
        return adapter.to_user(loss), adapter.to_user(outputs)
    return adapter.to_user(loss)


def find_injected_learning_rate(opt_state) -> bool:
    """Whether an optimizer state holds an injected `learning_rate` hyperparameter (optax.inject_hyperparams),
    at its top or nested in a chain."""
    if _injects_learning_rate(opt_state):
        return True
    if isinstance(opt_state, (tuple, list)):  # chains are tuples; wrappers (masked, ...) are NamedTuples
        return any(find_injected_learning_rate(s) for s in opt_state)
    return False


def _injects_learning_rate(opt_state) -> bool:
    hyper = getattr(opt_state, "hyperparams", None)
    return isinstance(hyper, Mapping) and "learning_rate" in hyper


def set_injected_learning_rate(opt_state, lr):
    """The optimizer state with every injected `learning_rate` set to `lr`."""
    if _injects_learning_rate(opt_state):
        hyper = opt_state.hyperparams
        value = jnp.asarray(lr, jnp.result_type(hyper["learning_rate"]))
        return opt_state._replace(hyperparams={**hyper, "learning_rate": value})
    if isinstance(opt_state, tuple) and hasattr(opt_state, "_fields"):
        return opt_state._replace(**{f: set_injected_learning_rate(getattr(opt_state, f), lr) for f in opt_state._fields})
    if isinstance(opt_state, (tuple, list)):
        return type(opt_state)(set_injected_learning_rate(s, lr) for s in opt_state)
    return opt_state


def make_train_step(adapter, tx: optax.GradientTransformation, config: StepConfig, hooks, with_num_items: bool = True):
    """The pure train step. `window` holds the micro-batches stacked on a leading axis; `mask` is 1
    for real micro-batches and 0 for the padding of a short last window."""
    trace_info: dict = {}
    loss_fn = make_loss_fn(adapter, config, hooks, train=True, trace_info=trace_info)

    def train_step(state, window, mask, num_items):
        params = state["params"]
        scale = state["loss_scale"] if config.loss_scaling else jnp.float32(1.0)
        step_rng = jax.random.fold_in(state["rng"], state["step"])
        items = num_items if with_num_items else None

        def micro(carry, xs):
            grads, extra = carry
            batch, real, index = xs

            # `extra` enters as an argument (not a closure) so NNX can update its RNG counts at
            # the trace level of the gradient.
            def objective(p, ex):
                loss, (_, new_extra) = loss_fn(p, ex, batch, jax.random.fold_in(step_rng, index), items)
                # Padding micro-batches weigh 0; per-batch mean losses are averaged over the window.
                weight = real if trace_info["normalized"] else real / jnp.sum(mask)
                return loss * weight * scale, (loss * weight, new_extra)

            g, (reported, new_extra) = jax.grad(objective, has_aux=True)(params, extra)
            grads = jax.tree.map(lambda a, b: a + b.astype(a.dtype), grads, g)
            return (grads, new_extra), reported

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        indices = jnp.arange(mask.shape[0])
        (grads, extra), losses = jax.lax.scan(micro, (zeros, state["extra"]), (window, mask, indices))
        grads = jax.tree.map(lambda g: g / scale, grads)
        grad_norm = _global_norm(grads)
        if config.max_grad_norm and config.max_grad_norm > 0:
            coef = jnp.minimum(config.max_grad_norm / (grad_norm + 1e-6), 1.0)
            grads = jax.tree.map(lambda g: g * coef, grads)
        opt_state = state["opt_state"]
        if config.lr_injected:
            lr = config.lr_schedule(state["step"]) * state["lr_scale"]
            opt_state = set_injected_learning_rate(opt_state, lr)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        if not config.lr_injected:
            factor = config.update_scale(state["step"]) * state["lr_scale"]
            updates = jax.tree.map(lambda u: (u * factor).astype(u.dtype), updates)
        new_params = optax.apply_updates(params, updates)
        new_state = dict(state, params=new_params, opt_state=opt_state, extra=extra, step=state["step"] + 1)
        if config.loss_scaling:
            finite = jnp.isfinite(grad_norm)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            new_state["params"] = keep(new_params, params)
            new_state["opt_state"] = keep(opt_state, state["opt_state"])
            new_state["step"] = jnp.where(finite, state["step"] + 1, state["step"])
            good = jnp.where(finite, state["good_steps"] + 1, 0)
            grow = good >= _FP16_GROWTH_INTERVAL
            new_state["loss_scale"] = jnp.where(finite, jnp.where(grow, scale * 2, scale), scale / 2)
            new_state["good_steps"] = jnp.where(grow, 0, good)
        if config.nan_policy != "ignore":
            new_state = apply_nan_policy(config, state, new_state, losses, grad_norm)
            return new_state, {"loss": losses, "grad_norm": grad_norm, "nan": new_state["nan"]}
        return new_state, {"loss": losses, "grad_norm": grad_norm}

    return train_step


def _without_ignored(outputs, ignore_keys: tuple):
    if isinstance(outputs, Mapping) and ignore_keys:
        return {k: v for k, v in outputs.items() if k not in ignore_keys}
    return outputs


def make_eval_step(adapter, config: StepConfig, hooks, has_labels: bool = True, count_items: bool = False,
                   shifts_labels: bool = False, ignore_keys: tuple = ()):
    """(params, extra, batch) -> (loss or None, logits or None); no dropout, no update.

    With labels the loss comes from the (overridable) compute_loss with return_outputs=True; with
    `count_items` it is given the batch's label-token count, counted on device. Without labels the
    model's outputs are the logits. Output keys in `ignore_keys` are left out of the logits.
    """
    from .bound_model import BoundModel

    loss_fn = make_loss_fn(adapter, config, hooks, train=False)
    prepares_inputs = hooks.overrides("_prepare_inputs") or hooks.overrides("_prepare_input")
    rng = jax.random.key(0)

    def eval_step(params, extra, batch):
        if has_labels:
            num_items = None
            if count_items:
                labels = batch["shift_labels"] if "shift_labels" in batch else batch["labels"]
                if shifts_labels and "shift_labels" not in batch:
                    labels = labels[..., 1:]
                num_items = jnp.sum(labels != -100).astype(jnp.float32)
            loss, (outputs, _) = loss_fn(params, extra, batch, rng, num_items)
            _, logits = split_outputs(_without_ignored(outputs, ignore_keys))
            return loss, logits
        model = BoundModel(adapter, _cast_floats(params, config.compute_dtype), extra, rng, False)
        with adapter.user_context():
            inputs = adapter.to_user(_cast_floats(dict(batch), config.compute_dtype))
            if prepares_inputs:
                inputs = hooks.prepare_inputs(inputs)
            outputs = adapter.from_user(model(**inputs))
        loss, logits = split_outputs(_without_ignored(outputs, ignore_keys))
        return loss, logits

    return eval_step
