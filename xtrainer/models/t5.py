"""T5-style encoder-decoder in Flax NNX (reference seq2seq model for the JAX backend).

Owns: `T5Config` (with converters to/from `transformers.T5Config`), `T5ForConditionalGeneration`
(shared embedding, encoder and decoder stacks with bucketed relative position bias, RMS-style
layer norm, dense-act-dense or gated feed-forward, tied or untied LM head) and `seq2seq_lm_loss`.
The math follows the T5 papers and transformers' modeling_t5 so imported HF weights give the same
logits (checked to 1e-4 in tests/models/test_t5.py); weight import/export lives in `t5_interop`.

T5 particulars the code keeps: q.k scores are not scaled by 1/sqrt(d_kv) (the init absorbs it);
only the first layer of each stack owns a relative-attention-bias table, and every layer reuses
its bias; the decoder's buckets are one-directional; with tied embeddings the decoder output is
scaled by d_model**-0.5 before the (shared) output projection.

Generation (`xtrainer.models.generation`) runs `encode` once, then `decode_step` per new token
against a KV cache (`init_decode_cache`: per-layer self-attention keys/values of a fixed length and
the cross-attention keys/values of the encoder output, computed once).

Parameter logical axes (see `xtrainer.models.sharding`):
    shared.embedding                                    (vocab, embed)
    {encoder,decoder}.relative_attention_bias.embedding (None, heads)
    block[i].{self_attn,cross_attn}.{q,k,v}.kernel      (embed, heads, kv)
    block[i].{self_attn,cross_attn}.o.kernel            (heads, kv, embed)
    block[i].ff.{wi,wi_0,wi_1}.kernel                   (embed, mlp)
    block[i].ff.wo.kernel                               (mlp, embed)
    every *_norm.scale                                  (norm,)
    lm_head.kernel (untied only)                        (embed, vocab)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ._nn import NEFTUNE_SITE, Dense, Embed, ModuleList, RMSNorm, base_dropout_key, dropout, fold
from .bert import _ACTIVATIONS

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of `T5ForConditionalGeneration`; names follow transformers.T5Config.

    feed_forward_proj is "relu" (T5 v1.0) or "gated-gelu" (v1.1 / flan: gelu_new(wi_0 x) * wi_1 x),
    or any "act" / "gated-act" with an activation known to BERT's table. tie_word_embeddings=True
    shares the input embedding with the LM head and scales decoder outputs by d_model**-0.5 (T5
    v1.0); False gives v1.1's separate, unscaled head. dtype/param_dtype/remat as in LlamaConfig.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None -> num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    eos_token_id: Any = 1
    decoder_start_token_id: int | None = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):  # configs are static attributes: keep them hashable
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or self.activation not in _ACTIVATIONS:
            raise NotImplementedError(
                f"feed_forward_proj={self.feed_forward_proj!r}: use 'act' or 'gated-act' with act in "
                f"{sorted(_ACTIVATIONS)}")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        act = self.feed_forward_proj.split("-")[-1]
        # HF maps "gated-gelu" to the tanh approximation (gelu_new), which T5 v1.1 was trained with.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers if self.num_decoder_layers is not None else self.num_layers

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> T5Config:
        """From a `transformers.T5Config` or its dict (config.json); overrides set dtype etc.

        transformers >= 5.2x always writes tie_word_embeddings=True for T5 and records an untied
        head as scale_decoder_outputs=False; that flag wins when present.
        """
        d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype", "remat", "tie_word_embeddings"}
        kwargs = {k: d[k] for k in names if k in d}
        kwargs["tie_word_embeddings"] = bool(d.get("scale_decoder_outputs", d.get("tie_word_embeddings", True)))
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> Any:
        """The equivalent `transformers.T5Config` (imports transformers lazily)."""
        import transformers

        return transformers.T5Config(
            vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
            num_layers=self.num_layers, num_decoder_layers=self.decoder_layers, num_heads=self.num_heads,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            dropout_rate=self.dropout_rate, layer_norm_epsilon=self.layer_norm_epsilon,
            initializer_factor=self.initializer_factor, feed_forward_proj=self.feed_forward_proj,
            tie_word_embeddings=self.tie_word_embeddings, pad_token_id=self.pad_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            decoder_start_token_id=self.decoder_start_token_id, is_encoder_decoder=True,
            architectures=["T5ForConditionalGeneration"],
        )


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """Mesh-TensorFlow's bucketing of (key position - query position) into [0, num_buckets).

    Half the buckets (per direction when bidirectional) hold exact small distances; the rest grow
    logarithmically up to max_distance, beyond which everything shares the last bucket. The
    one-directional (decoder) form folds positive distances (the future, masked anyway) onto 0.
    """
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float32 log, truncated toward zero, in the same order as the reference so bucket edges agree.
    safe = jnp.maximum(distance, 1).astype(jnp.float32)
    scaled = jnp.log(safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = jnp.minimum(max_exact + scaled.astype(relative_position.dtype), num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


class T5Attention(nnx.Module):
    """Multi-head attention without q.k scaling; `bias` (1|B, H, S, T) carries position and mask terms."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        e, h, d, f = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.initializer_factor
        common = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q = Dense((e,), (h, d), ("embed", "heads", "kv"), std=f * (e * d) ** -0.5, **common)
        self.k = Dense((e,), (h, d), ("embed", "heads", "kv"), std=f * e ** -0.5, **common)
        self.v = Dense((e,), (h, d), ("embed", "heads", "kv"), std=f * e ** -0.5, **common)
        self.o = Dense((h, d), (e,), ("heads", "kv", "embed"), std=f * (h * d) ** -0.5, **common)
        self.rate = cfg.dropout_rate

    def __call__(self, x, context, bias, mask, key, deterministic):
        return self.attend(self.q(x), self.k(context), self.v(context), bias, mask, key, deterministic)

    def attend(self, q, k, v, bias, mask, key=None, deterministic=True):
        """Output projection of softmax(q.k + bias) v; q (B, S, H, D), k/v (B, T, H, D)."""
        scores = jnp.einsum("bshd,bthd->bhst", q, k).astype(jnp.float32) + bias.astype(jnp.float32)
        # The dtype minimum (not -inf) keeps a fully masked row finite, as HF's additive masks do.
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = dropout(jax.nn.softmax(scores, axis=-1), self.rate, key, deterministic).astype(v.dtype)
        return self.o(jnp.einsum("bhst,bthd->bshd", probs, v))


class T5FeedForward(nnx.Module):
    """wo(act(wi x)) or wo(act(wi_0 x) * wi_1 x), with dropout before wo as in T5."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        e, m, f = cfg.d_model, cfg.d_ff, cfg.initializer_factor
        common = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.gated = cfg.is_gated
        # Assigned once each: flax >= 0.12 fixes an attribute as static or data at first assignment.
        self.wi = None if self.gated else Dense((e,), (m,), ("embed", "mlp"), std=f * e ** -0.5, **common)
        self.wi_0 = Dense((e,), (m,), ("embed", "mlp"), std=f * e ** -0.5, **common) if self.gated else None
        self.wi_1 = Dense((e,), (m,), ("embed", "mlp"), std=f * e ** -0.5, **common) if self.gated else None
        self.wo = Dense((m,), (e,), ("mlp", "embed"), std=f * m ** -0.5, **common)
        self.act, self.rate = cfg.activation, cfg.dropout_rate

    def __call__(self, x, key, deterministic):
        act = _ACTIVATIONS[self.act]
        h = act(self.wi_0(x)) * self.wi_1(x) if self.gated else act(self.wi(x))
        return self.wo(dropout(h, self.rate, key, deterministic))


class T5Block(nnx.Module):
    """Pre-norm self-attention, (decoder) cross-attention and feed-forward, each with a residual."""

    def __init__(self, cfg: T5Config, is_decoder: bool, *, rngs: nnx.Rngs):
        norm = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        e, eps = cfg.d_model, cfg.layer_norm_epsilon
        self.is_decoder = is_decoder
        self.self_attn_norm = RMSNorm(e, eps, **norm)
        self.self_attn = T5Attention(cfg, rngs=rngs)
        self.cross_attn_norm = RMSNorm(e, eps, **norm) if is_decoder else None
        self.cross_attn = T5Attention(cfg, rngs=rngs) if is_decoder else None
        self.ff_norm = RMSNorm(e, eps, **norm)
        self.ff = T5FeedForward(cfg, rngs=rngs)
        self.rate = cfg.dropout_rate

    def __call__(self, x, self_bias, self_mask, enc, cross_bias, cross_mask, key, deterministic):
        def residual(x, y, i):
            return x + dropout(y, self.rate, fold(key, i), deterministic)

        h = self.self_attn_norm(x)
        x = residual(x, self.self_attn(h, h, self_bias, self_mask, fold(key, 0), deterministic), 1)
        if self.is_decoder:
            h = self.cross_attn_norm(x)
            x = residual(x, self.cross_attn(h, enc, cross_bias, cross_mask, fold(key, 2), deterministic), 3)
        return residual(x, self.ff(self.ff_norm(x), fold(key, 4), deterministic), 5)

    def step(self, x, pos, self_bias, self_mask, cache_k, cache_v, cross_k, cross_v, cross_mask):
        """One decoder position x (N, 1, E) at `pos` against cached keys/values (no dropout).

        Returns (x, cache_k, cache_v) with this position's key/value written at `pos`.
        """
        h = self.self_attn_norm(x)
        attn = self.self_attn
        cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, attn.k(h).astype(cache_k.dtype), pos, axis=1)
        cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, attn.v(h).astype(cache_v.dtype), pos, axis=1)
        x = x + attn.attend(attn.q(h), cache_k, cache_v, self_bias, self_mask)
        h = self.cross_attn_norm(x)
        x = x + self.cross_attn.attend(self.cross_attn.q(h), cross_k, cross_v, jnp.zeros((), jnp.float32), cross_mask)
        return x + self.ff(self.ff_norm(x), None, True), cache_k, cache_v


def _run_block(block, x, self_bias, self_mask, enc, cross_bias, cross_mask, key, deterministic):
    return block(x, self_bias, self_mask, enc, cross_bias, cross_mask, key, deterministic)


class T5Stack(nnx.Module):
    """An encoder (bidirectional) or decoder (causal + cross-attention) stack over shared embeddings."""

    def __init__(self, cfg: T5Config, is_decoder: bool, *, rngs: nnx.Rngs):
        self.config, self.is_decoder = cfg, is_decoder
        n = cfg.decoder_layers if is_decoder else cfg.num_layers
        # HF keeps this table inside block 0's self-attention; every block reuses the bias it makes.
        self.relative_attention_bias = Embed(
            cfg.relative_attention_num_buckets, cfg.num_heads, (None, "heads"),
            std=cfg.initializer_factor * cfg.d_model ** -0.5, dtype=jnp.float32, param_dtype=cfg.param_dtype,
            rngs=rngs)
        self.block = ModuleList([T5Block(cfg, is_decoder, rngs=rngs) for _ in range(n)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=cfg.dtype,
                                        param_dtype=cfg.param_dtype)

    def position_bias(self, query_len: int, key_len: int, query_offset: Any = 0) -> jax.Array:
        """(1, heads, query_len, key_len) float32 relative position bias; queries start at query_offset."""
        cfg = self.config
        rel = jnp.arange(key_len)[None, :] - (jnp.arange(query_len)[:, None] + query_offset)
        buckets = relative_position_bucket(rel, bidirectional=not self.is_decoder,
                                           num_buckets=cfg.relative_attention_num_buckets,
                                           max_distance=cfg.relative_attention_max_distance)
        return jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))[None]

    def __call__(self, x, attention_mask=None, enc=None, enc_mask=None, *, key=None, deterministic=True):
        b, s = x.shape[:2]
        mask = jnp.ones((b, 1, 1, s), bool) if attention_mask is None else (attention_mask[:, None, None, :] != 0)
        if self.is_decoder:
            mask = mask & jnp.tril(jnp.ones((s, s), bool))[None, None]
        self_bias = self.position_bias(s, s)
        cross_bias = cross_mask = None
        if self.is_decoder:
            t = enc.shape[1]
            cross_bias = jnp.zeros((1, 1, 1, t), jnp.float32)  # cross-attention has no position bias
            cross_mask = jnp.ones((b, 1, 1, t), bool) if enc_mask is None else (enc_mask[:, None, None, :] != 0)
        x = dropout(x, self.config.dropout_rate, fold(key, 0), deterministic)
        run = nnx.remat(_run_block, static_argnums=(8,)) if self.config.remat else _run_block
        for i, block in enumerate(self.block):
            x = run(block, x, self_bias, mask, enc, cross_bias, cross_mask, fold(key, i + 2), deterministic)
        return dropout(self.final_layer_norm(x), self.config.dropout_rate, fold(key, 1), deterministic)


def shift_right(labels: jax.Array, decoder_start_token_id: int, pad_token_id: int) -> jax.Array:
    """Teacher-forcing decoder inputs: [start, labels[:-1]] with -100 replaced by pad."""
    start = jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
    return jnp.where(shifted == IGNORE_INDEX, pad_token_id, shifted)


class T5ForConditionalGeneration(nnx.Module):
    """T5 encoder-decoder LM. `T5ForConditionalGeneration(config, rngs=nnx.Rngs(0))`.

    Call: `model(input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
    labels=None, *, num_items_in_batch=None, deterministic=True, rngs=None)` -> dict with "logits"
    (B, T, vocab) and, given labels, "loss" (`seq2seq_lm_loss`). Without decoder_input_ids they are
    `shift_right(labels)`. With deterministic=False, `rngs` (nnx.Rngs or a key) drives dropout.
    """

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.shared = Embed(config.vocab_size, config.d_model, ("vocab", "embed"), std=config.initializer_factor,
                            dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.encoder = T5Stack(config, False, rngs=rngs)
        self.decoder = T5Stack(config, True, rngs=rngs)
        self.lm_head = None if config.tie_word_embeddings else Dense(
            (config.d_model,), (config.vocab_size,), ("embed", "vocab"), use_bias=False,
            std=config.initializer_factor, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)

    def encode(self, input_ids, attention_mask=None, *, deterministic: bool = True, key=None) -> jax.Array:
        """Encoder hidden states (B, S, d_model)."""
        embedded = self.shared(input_ids, fold(key, NEFTUNE_SITE))
        return self.encoder(embedded, attention_mask, key=key, deterministic=deterministic)

    def decode(self, decoder_input_ids, encoder_hidden, encoder_attention_mask=None, decoder_attention_mask=None,
               *, deterministic: bool = True, key=None) -> jax.Array:
        """LM logits (B, T, vocab) of the decoder over `encoder_hidden`."""
        x = self.decoder(self.shared(decoder_input_ids, fold(key, NEFTUNE_SITE)), decoder_attention_mask,
                         encoder_hidden, encoder_attention_mask, key=key, deterministic=deterministic)
        return self._logits(x)

    def get_input_embeddings(self) -> Embed:
        """The shared token embedding of encoder and decoder (transformers' name; a trainer sets NEFTune on it)."""
        return self.shared

    def _logits(self, x):
        if self.lm_head is not None:
            return self.lm_head(x)
        return self.shared.attend(x * (self.config.d_model ** -0.5))

    def init_decode_cache(self, encoder_hidden, max_length: int) -> dict:
        """KV cache for `decode_step`: empty self-attention keys/values for max_length positions per
        decoder layer, and the cross-attention keys/values of `encoder_hidden`, computed once."""
        n = encoder_hidden.shape[0]
        cfg = self.config
        empty = jnp.zeros((cfg.decoder_layers, n, max_length, cfg.num_heads, cfg.d_kv), cfg.dtype)
        cross_k = jnp.stack([blk.cross_attn.k(encoder_hidden) for blk in self.decoder.block])
        cross_v = jnp.stack([blk.cross_attn.v(encoder_hidden) for blk in self.decoder.block])
        return {"self_k": empty, "self_v": empty, "cross_k": cross_k, "cross_v": cross_v}

    def decode_step(self, token, pos, cache: dict, encoder_attention_mask=None) -> tuple[jax.Array, dict]:
        """Logits (N, vocab) after feeding `token` (N,) at decoder position `pos`, and the updated cache.

        Equal to `decode(...)[:, pos]` over the same prefix, at the cost of one position instead of
        the whole prefix.
        """
        length = cache["self_k"].shape[2]
        x = self.shared(token[:, None])
        self_bias = self.decoder.position_bias(1, length, pos)
        self_mask = (jnp.arange(length) <= pos)[None, None, None, :]
        t = cache["cross_k"].shape[2]
        cross_mask = (jnp.ones((x.shape[0], 1, 1, t), bool) if encoder_attention_mask is None
                      else encoder_attention_mask[:, None, None, :] != 0)
        new_k, new_v = [], []
        for i, block in enumerate(self.decoder.block):
            x, k, v = block.step(x, pos, self_bias, self_mask, cache["self_k"][i], cache["self_v"][i],
                                 cache["cross_k"][i], cache["cross_v"][i], cross_mask)
            new_k.append(k)
            new_v.append(v)
        logits = self._logits(self.decoder.final_layer_norm(x))[:, 0]
        return logits, {**cache, "self_k": jnp.stack(new_k), "self_v": jnp.stack(new_v)}

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 labels=None, *, num_items_in_batch=None, deterministic: bool = True, rngs=None):
        cfg = self.config
        key = None if deterministic else base_dropout_key(rngs)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5ForConditionalGeneration needs decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, cfg.decoder_start_token_id or 0, cfg.pad_token_id or 0)
        enc = self.encode(input_ids, attention_mask, deterministic=deterministic, key=fold(key, 0))
        logits = self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask,
                             deterministic=deterministic, key=fold(key, 1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = seq2seq_lm_loss(logits, labels, num_items_in_batch=num_items_in_batch)
        return out


def seq2seq_lm_loss(logits, labels, *, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Cross entropy of logits (B, T, V) against unshifted labels (B, T), ignoring `ignore_index`.

    Mean over counted tokens, like HF's T5 loss; or sum / num_items_in_batch when that is given
    (gradient accumulation normalises by the tokens of the whole window).
    """
    logits = logits.astype(jnp.float32)
    valid = labels != ignore_index
    picked = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0))
    if num_items_in_batch is not None:
        return total / jnp.asarray(num_items_in_batch, jnp.float32)
    return total / jnp.sum(valid).astype(jnp.float32)
