"""Shared NNX building blocks for the reference models (private).

Owns: parameter creation with logical-axis metadata (portable across flax 0.11 and 0.12+),
variable get/set helpers, the small layers both models use (Dense, Embed, RMSNorm, LayerNorm),
attention math, explicit-key dropout, and the module-list container.
The public description of the logical axis names lives in `xtrainer.models.sharding`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# flax >= 0.12 refuses plain lists of modules as attributes and offers nnx.List; 0.11 has no
# nnx.List but accepts a plain list.
ModuleList = getattr(nnx, "List", list)

# flax >= 0.12 stores logical names under "out_sharding" and can shard eagerly at creation;
# flax 0.11 stores them under "sharding_names" and never shards eagerly.
_NEW_SHARDING_API = hasattr(nnx, "use_eager_sharding")

Names = tuple[str | None, ...]


def _eager_sharding_possible() -> bool:
    # Eager sharding of *logical* names only works when a mesh and logical->mesh rules are both
    # active; otherwise flax 0.12 raises at construction. Without them we only record the names
    # and leave placement to the backend (nnx.get_partition_spec / sharding.logical_partition_specs).
    if not nnx.using_eager_sharding():
        return False
    from flax.core import spmd

    mesh = jax.sharding.get_abstract_mesh()
    return (not mesh.empty) and bool(spmd.get_logical_axis_rules())


def param(value: jax.Array, names: Names) -> nnx.Param:
    """An nnx.Param holding `value`, annotated with one logical axis name per dimension."""
    names = tuple(names)
    if len(names) != jnp.ndim(value):
        raise ValueError(f"{len(names)} logical names {names} for a parameter of shape {jnp.shape(value)}")
    if _NEW_SHARDING_API:
        return nnx.Param(value, out_sharding=names, eager_sharding=_eager_sharding_possible())
    return nnx.Param(value, sharding_names=names)


def get_value(var: nnx.Variable) -> Any:
    """The raw value of a variable (flax 0.12 deprecates `.value`; 0.11 lacks get_value)."""
    return var.get_value() if hasattr(type(var), "get_value") else var.value


def set_value(var: nnx.Variable, value: Any) -> None:
    """Replace a variable's value, shape and dtype included."""
    if hasattr(type(var), "set_value"):
        var.set_value(value)
    else:
        var.value = value


def variable_names(var: nnx.Variable) -> Names | None:
    """The logical axis names recorded on a variable, or None."""
    meta = var.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        if meta.get(key) is not None:
            return tuple(meta[key])
    return None


@functools.partial(jax.jit, static_argnums=(1, 3))
def _scaled_normal(key, shape, std, dtype):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def normal(rngs: nnx.Rngs, shape: Sequence[int], std: float, dtype: Any) -> jax.Array:
    # One compiled program per (shape, dtype) instead of three eager ops: eager model construction
    # is dominated by compiling the RNG per new shape.
    return _scaled_normal(rngs.params(), tuple(shape), std, jnp.dtype(dtype))


class Dense(nnx.Module):
    """y = x . kernel (+ bias), contracting the last len(in_shape) axes of x.

    The kernel has shape in_shape + out_shape so attention projections can keep an explicit
    heads axis (shardable on its own) while staying a plain matmul.
    """

    def __init__(self, in_shape, out_shape, names: Names, *, use_bias: bool, std: float, dtype, param_dtype, rngs):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.dtype = dtype
        self.kernel = param(normal(rngs, self.in_shape + self.out_shape, std, param_dtype), names)
        self.bias = (
            param(jnp.zeros(self.out_shape, param_dtype), names[len(self.in_shape):]) if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.tensordot(x, self.kernel[...].astype(self.dtype), axes=len(self.in_shape))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """A (num_embeddings, features) lookup table; `attend` is the tied output projection.

    `neftune_noise_alpha` (None unless a trainer sets it, as transformers' Trainer sets it on a torch
    model's input embedding) adds NEFTune noise to the lookups of calls given a `noise_key`.
    """

    def __init__(self, num, features, names: Names, *, std: float, dtype, param_dtype, rngs):
        self.dtype = dtype
        self.embedding = param(normal(rngs, (num, features), std, param_dtype), names)
        self.neftune_noise_alpha = None

    def __call__(self, ids: jax.Array, noise_key: jax.Array | None = None) -> jax.Array:
        x = jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
        return neftune_noise(x, self.neftune_noise_alpha, noise_key)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding[...].astype(self.dtype))


# fold_in index of the NEFTune draw: apart from the small indices of the dropout sites.
NEFTUNE_SITE = 1_000_003


def neftune_noise(x: jax.Array, alpha: float | None, key: jax.Array | None) -> jax.Array:
    """NEFTune: x + U(-b, b) with b = alpha / sqrt(seq_len * hidden) for embeddings x (B, S, H).

    The identity without alpha or key (evaluation passes no key). Same bound as transformers'
    neftune_post_forward_hook, with the randomness drawn from `key` (so a run is reproducible per seed).
    """
    if alpha is None or key is None:
        return x
    bound = float(np.float32(alpha) / np.sqrt(np.float32(x.shape[-2] * x.shape[-1])))
    return x + jax.random.uniform(key, x.shape, jnp.float32, -bound, bound).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Llama RMSNorm: normalise in float32, cast back, then scale (HF's order of operations)."""

    def __init__(self, features: int, eps: float, *, dtype, param_dtype):
        self.eps, self.dtype = eps, dtype
        self.scale = param(jnp.ones((features,), param_dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nnx.Module):
    """Post-LN LayerNorm with scale and bias; statistics in float32."""

    def __init__(self, features: int, eps: float, *, dtype, param_dtype):
        self.eps, self.dtype = eps, dtype
        self.scale = param(jnp.ones((features,), param_dtype), ("norm",))
        self.bias = param(jnp.zeros((features,), param_dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None, deterministic: bool) -> jax.Array:
    """Inverted dropout with an explicit key; identity when deterministic or rate == 0."""
    if deterministic or rate == 0.0:
        return x
    if key is None:
        raise ValueError("dropout needs a key: pass rngs=nnx.Rngs(dropout=...) or a PRNG key, or deterministic=True")
    if rate >= 1.0:
        return jnp.zeros_like(x)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def base_dropout_key(rngs: Any) -> jax.Array | None:
    """One PRNG key from `rngs` (nnx.Rngs -> its 'dropout' stream, or a key used as is)."""
    if rngs is None:
        return None
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout()
    return rngs


def fold(key: jax.Array | None, i: int) -> jax.Array | None:
    # Deterministic per-site keys: each dropout site folds in its own index, so remat recomputation
    # and repeated calls with the same base key draw the same masks.
    return None if key is None else jax.random.fold_in(key, i)


def attention(q, k, v, mask, *, dropout_rate=0.0, key=None, deterministic=True):
    """Softmax attention. q: (B, S, H, D); k, v: (B, T, KV, D) with H % KV == 0 (grouped-query);
    mask: bool, broadcastable to (B, H, S, T), True = attend. Returns (B, S, H, D).

    Masked scores get the dtype's minimum rather than -inf so a fully masked row (a padded query)
    yields a uniform average instead of NaN, as HF's additive masks do.
    """
    b, s, h, d = q.shape
    kv = k.shape[2]
    # Group queries by the kv head they share: (B, S, KV, G, D) keeps k/v unrepeated in memory.
    qg = q.reshape(b, s, kv, h // kv, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k).astype(jnp.float32) / math.sqrt(d)
    mask = jnp.broadcast_to(mask, (b, h, s, k.shape[1])).reshape(b, kv, h // kv, s, k.shape[1])
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = dropout(probs, dropout_rate, key, deterministic).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(b, s, h, d)
