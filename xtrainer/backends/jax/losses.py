"""Trainer-side losses of the JAX backend that replace the model's own loss.

Owns `label_smoothed_loss` (TrainingArguments.label_smoothing_factor), the same function as the torch
backend's `label_smoothed_loss` and transformers' LabelSmoother, so that a run with label smoothing
logs the same loss on every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def label_smoothed_loss(logits, labels, epsilon: float, num_items=None, shift: bool = False) -> jax.Array:
    """Cross entropy with label smoothing `epsilon`, as transformers' LabelSmoother computes it.

    (1 - epsilon) * NLL of the label + epsilon * mean over the vocabulary of -log p, both summed
    over the positions whose label is not -100 and divided by `num_items` (the window's label count,
    HF's gradient-accumulation normalisation) or, without it, by this batch's count of such positions.

    Args:
        logits: [..., vocab] scores (any float dtype; the log-softmax runs in float32).
        labels: integer class ids with the shape of logits minus its last axis; -100 is ignored.
        epsilon: the smoothing factor in [0, 1).
        num_items: the denominator, or None for this batch's count of counted positions.
        shift: causal-LM alignment: the logits at position t are scored against labels[t + 1].

    Example:
        >>> label_smoothed_loss(jnp.zeros((1, 3, 5)), jnp.array([[1, 2, -100]]), 0.1)  # log(5)
    """
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    neg_log_probs = -jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    padding = labels == IGNORE_INDEX
    picked = jnp.take_along_axis(neg_log_probs, jnp.where(padding, 0, labels)[..., None], axis=-1)[..., 0]
    nll = jnp.sum(jnp.where(padding, 0.0, picked))
    smoothed = jnp.sum(jnp.where(padding, 0.0, jnp.sum(neg_log_probs, axis=-1)))
    active = jnp.sum(~padding).astype(jnp.float32) if num_items is None else jnp.asarray(num_items, jnp.float32)
    return (1 - epsilon) * nll / active + epsilon * smoothed / (active * neg_log_probs.shape[-1])


def make_label_smoother(epsilon: float, shift: bool) -> Callable | None:
    """A loss `(outputs, labels, num_items) -> loss` over the model's logits, or None when epsilon is 0.

    `outputs` is what the model returned: its "logits" entry, or its first element (as HF reads it).
    """
    if not epsilon:
        return None

    def smoother(outputs, labels, num_items):
        if isinstance(outputs, Mapping):
            logits = outputs["logits"]
        elif isinstance(outputs, (tuple, list)):
            logits = outputs[0]
        else:
            logits = outputs
        return label_smoothed_loss(logits, labels, epsilon, num_items, shift=shift)

    return smoother
