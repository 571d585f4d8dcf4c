"""Llama-style causal language model in Flax NNX (reference model for the JAX backend).

Owns: `LlamaConfig` (with converters to/from `transformers.LlamaConfig`), `LlamaForCausalLM`
(RMSNorm, rotate-half RoPE, SwiGLU MLP, grouped-query causal attention, optional per-layer remat)
and `causal_lm_loss` (HF's ForCausalLMLoss). The math follows transformers' modeling_llama so that
imported HF weights give the same logits; weight import/export lives in `hf_interop`.

Parameter logical axes (see `xtrainer.models.sharding`):
    model.embed_tokens.embedding          (vocab, embed)
    layers[i].self_attn.q_proj.kernel      (embed, heads, kv)     bias (heads, kv)
    layers[i].self_attn.{k,v}_proj.kernel  (embed, kv_heads, kv)  bias (kv_heads, kv)
    layers[i].self_attn.o_proj.kernel      (heads, kv, embed)     bias (embed,)
    layers[i].mlp.{gate,up}_proj.kernel    (embed, mlp)
    layers[i].mlp.down_proj.kernel         (mlp, embed)
    *_layernorm.scale, model.norm.scale    (norm,)
    lm_head.kernel (untied only)           (embed, vocab)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ..activation_sharding import shard_batch
from ._nn import NEFTUNE_SITE, Dense, Embed, ModuleList, RMSNorm, attention, base_dropout_key, fold

IGNORE_INDEX = -100
# What a rematerialised decoder layer keeps for the backward pass (jax.checkpoint policies), by name.
PROJECTIONS = ("query_proj", "key_proj", "value_proj", "out_proj", "mlp_gate", "mlp_up", "mlp_down")
REMAT_POLICIES = {
    "full": None,  # nothing: the layer's forward runs again
    "minimal": jax.checkpoint_policies.save_only_these_names(*PROJECTIONS),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of `LlamaForCausalLM`; field names follow transformers.LlamaConfig.

    dtype is the compute dtype, param_dtype the storage dtype of parameters; remat recomputes each
    decoder layer's activations in the backward pass (less memory, more compute). remat_policy says
    what a rematerialised layer keeps: "full" keeps only its input (the forward runs again: ~1/3 more
    FLOPs), "minimal" also keeps the outputs of its seven projections and recomputes only attention
    and elementwise work (MaxText's policy of that name).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> num_attention_heads (no GQA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: Any = 2
    pad_token_id: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: str = "full"

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}")
        # Configs are static module attributes and must hash: a list of eos ids becomes a tuple.
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> LlamaConfig:
        """From a `transformers.LlamaConfig` or its dict (config.json); overrides set dtype etc.

        Raises NotImplementedError for features this model does not implement (non-default RoPE
        scaling, activations other than SiLU).
        """
        d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        # transformers >= 5 nests RoPE settings in rope_parameters; 4.x config.json files keep
        # rope_theta / rope_scaling at the top level.
        rope = dict(d.get("rope_parameters") or {})
        if d.get("rope_scaling"):
            rope.update(d["rope_scaling"])
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise NotImplementedError(f"rope_type={rope_type!r} is not supported (only 'default')")
        if d.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype", "remat", "remat_policy", "rope_theta"}
        kwargs = {k: d[k] for k in names if k in d}
        kwargs["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> Any:
        """The equivalent `transformers.LlamaConfig` (imports transformers lazily)."""
        import transformers

        return transformers.LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_size,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            initializer_range=self.initializer_range,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id,
            hidden_act="silu",
            architectures=["LlamaForCausalLM"],
        )


def rope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables (B, S, head_dim) for HF's default RoPE: both halves repeat the frequencies."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, S, H, D). HF's rotate_half convention: pairs (i, i + D/2), not interleaved pairs."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        e, h, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
        if h % kv:
            raise ValueError(f"num_attention_heads={h} is not a multiple of num_key_value_heads={kv}")
        common = dict(std=cfg.initializer_range, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q_proj = Dense((e,), (h, d), ("embed", "heads", "kv"), use_bias=cfg.attention_bias, **common)
        self.k_proj = Dense((e,), (kv, d), ("embed", "kv_heads", "kv"), use_bias=cfg.attention_bias, **common)
        self.v_proj = Dense((e,), (kv, d), ("embed", "kv_heads", "kv"), use_bias=cfg.attention_bias, **common)
        self.o_proj = Dense((h, d), (e,), ("heads", "kv", "embed"), use_bias=cfg.attention_bias, **common)

    def __call__(self, x, cos, sin, mask):
        q = apply_rope(checkpoint_name(self.q_proj(x), "query_proj"), cos, sin)
        k = apply_rope(checkpoint_name(self.k_proj(x), "key_proj"), cos, sin)
        v = checkpoint_name(self.v_proj(x), "value_proj")
        return checkpoint_name(self.o_proj(attention(q, k, v, mask)), "out_proj")


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        e, m = cfg.hidden_size, cfg.intermediate_size
        common = dict(use_bias=cfg.mlp_bias, std=cfg.initializer_range, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, rngs=rngs)
        self.gate_proj = Dense((e,), (m,), ("embed", "mlp"), **common)
        self.up_proj = Dense((e,), (m,), ("embed", "mlp"), **common)
        self.down_proj = Dense((m,), (e,), ("mlp", "embed"), **common)

    def __call__(self, x):
        gate = checkpoint_name(self.gate_proj(x), "mlp_gate")
        up = checkpoint_name(self.up_proj(x), "mlp_up")
        return checkpoint_name(self.down_proj(jax.nn.silu(gate) * up), "mlp_down")


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        norm = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.self_attn = LlamaAttention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.mlp = LlamaMLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def _run_layer(layer, x, cos, sin, mask):
    return layer(x, cos, sin, mask)


class LlamaModel(nnx.Module):
    """Embeddings + decoder stack + final norm; returns the last hidden states."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), std=cfg.initializer_range,
                                  dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.layers = ModuleList([LlamaDecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, noise_key=None):
        cfg = self.config
        b, s = input_ids.shape
        if position_ids is None:
            # Like HF's forward: positions count from 0 whatever the padding (left padding included).
            position_ids = jnp.broadcast_to(jnp.arange(s), (b, s))
        cos, sin = rope_cos_sin(position_ids, cfg.head_size, cfg.rope_theta)
        mask = jnp.tril(jnp.ones((s, s), dtype=bool))[None, None]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] != 0)
        run = nnx.remat(_run_layer, policy=REMAT_POLICIES[cfg.remat_policy]) if cfg.remat else _run_layer
        # Hidden states stay split along the batch between layers (FSDP; see xtrainer/activation_sharding.py).
        x = shard_batch(self.embed_tokens(input_ids, noise_key))
        for layer in self.layers:
            x = shard_batch(run(layer, x, cos, sin, mask))
        return self.norm(x)


class LlamaForCausalLM(nnx.Module):
    """Llama causal LM. `LlamaForCausalLM(config, rngs=nnx.Rngs(0))`.

    Call: `model(input_ids, attention_mask=None, labels=None, *, position_ids=None,
    num_items_in_batch=None, shift_labels=None, deterministic=True, rngs=None)` -> dict with
    "logits" (B, S, vocab) in config.dtype and, when labels or shift_labels are given, "loss"
    (float32). Llama has no dropout; with deterministic=False, `rngs` only drives NEFTune noise (when a
    trainer set `neftune_noise_alpha` on `get_input_embeddings()`).
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, rngs=rngs)
        # Assigned once: flax >= 0.12 fixes an attribute as static or data at first assignment.
        self.lm_head = None if config.tie_word_embeddings else Dense(
            (config.hidden_size,), (config.vocab_size,), ("embed", "vocab"), use_bias=False,
            std=config.initializer_range, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, labels=None, *, position_ids=None,
                 num_items_in_batch=None, shift_labels=None, deterministic: bool = True, rngs=None):
        # No dropout in this architecture: the step's key only feeds NEFTune noise (training only).
        neftune = not deterministic and self.model.embed_tokens.neftune_noise_alpha is not None
        noise_key = fold(base_dropout_key(rngs), NEFTUNE_SITE) if neftune else None
        hidden = self.model(input_ids, attention_mask, position_ids, noise_key)
        logits = self.model.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        out = {"logits": logits}
        if labels is not None or shift_labels is not None:
            out["loss"] = causal_lm_loss(logits, labels, num_items_in_batch=num_items_in_batch,
                                         shift_labels=shift_labels)
        return out

    def get_input_embeddings(self) -> Embed:
        """The token embedding (transformers' name; a trainer sets NEFTune on it)."""
        return self.model.embed_tokens


def causal_lm_loss(logits, labels=None, *, num_items_in_batch=None, shift_labels=None,
                   ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """HF's ForCausalLMLoss: token t predicts labels[t + 1]; ignore_index tokens do not count.

    Mean over counted tokens (NaN when none count, as in torch), or sum / num_items_in_batch when
    that is given (gradient accumulation normalises by the tokens of all micro-batches).
    `shift_labels` (already shifted, e.g. under sequence parallelism) replaces `labels`.
    """
    if shift_labels is None:
        pad = jnp.full(labels.shape[:-1] + (1,), ignore_index, dtype=labels.dtype)
        shift_labels = jnp.concatenate([labels[..., 1:], pad], axis=-1)
    logits = logits.astype(jnp.float32)
    valid = shift_labels != ignore_index
    safe = jnp.where(valid, shift_labels, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(valid, logz - picked, 0.0))
    if num_items_in_batch is not None:
        return total / jnp.asarray(num_items_in_batch, jnp.float32)
    return total / jnp.sum(valid).astype(jnp.float32)
