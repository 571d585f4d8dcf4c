"""BERT encoder with a sequence-classification head in Flax NNX (reference model for the JAX backend).

Owns: `BertConfig` (with converters to/from `transformers.BertConfig`), `BertForSequenceClassification`
(embeddings, post-LN encoder layers, tanh pooler, classifier) and `sequence_classification_loss`
(HF's regression / single-label / multi-label choice). The math follows transformers'
modeling_bert so imported HF weights give the same logits; weight import/export lives in `hf_interop`.

Dropout never draws from hidden module state: `__call__(..., deterministic=False, rngs=...)` takes an
`nnx.Rngs` (its 'dropout' stream) or a PRNG key, and each dropout site folds in a fixed index, so the
trainer controls randomness explicitly and a remat'd layer redraws the same masks.

Parameter logical axes (see `xtrainer.models.sharding`):
    bert.embeddings.word_embeddings.embedding           (vocab, embed)
    bert.embeddings.{position,token_type}_embeddings    (None, embed)
    layer[i].attention.{query,key,value}.kernel         (embed, heads, kv)   bias (heads, kv)
    layer[i].attention.output.kernel                     (heads, kv, embed)   bias (embed,)
    layer[i].intermediate.kernel                         (embed, mlp)         bias (mlp,)
    layer[i].output.kernel                               (mlp, embed)         bias (embed,)
    every LayerNorm scale/bias                           (norm,)
    bert.pooler.kernel                                   (embed, None)        bias (None,)
    classifier.kernel                                    (embed, None)        bias (None,)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ._nn import NEFTUNE_SITE, Dense, Embed, LayerNorm, ModuleList, attention, base_dropout_key, dropout, fold

# HF activation names -> jax functions. "gelu" is the exact erf form, as in torch.
_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of `BertForSequenceClassification`; names follow transformers.BertConfig.

    `label_names` (index order) keeps id2label across import/export; problem_type None means
    "regression if num_labels == 1, else single-label for integer labels, multi-label for floats".
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    classifier_dropout: float | None = None
    num_labels: int = 2
    label_names: tuple[str, ...] | None = None
    problem_type: str | None = None
    pad_token_id: int | None = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise NotImplementedError(f"hidden_act={self.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}")
        if self.label_names is not None and len(self.label_names) != self.num_labels:
            raise ValueError(f"{len(self.label_names)} label_names for num_labels={self.num_labels}")

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> BertConfig:
        """From a `transformers.BertConfig` or its dict (config.json); overrides set dtype etc."""
        d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise NotImplementedError("only absolute position embeddings are supported")
        skip = {"dtype", "param_dtype", "remat", "label_names", "num_labels"}
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and f.name not in skip}
        id2label = d.get("id2label")
        if id2label:
            # config.json keys are strings; order the labels by their integer id.
            labels = {int(k): v for k, v in id2label.items()}
            kwargs["num_labels"] = len(labels)
            kwargs["label_names"] = tuple(labels[i] for i in sorted(labels))
        elif "num_labels" in d:
            kwargs["num_labels"] = d["num_labels"]
        kwargs.update(overrides)
        # Overriding num_labels (a new head on a pretrained encoder) drops label names that no longer fit.
        label_names = kwargs.get("label_names")
        if label_names is not None and len(label_names) != kwargs.get("num_labels", 2) and "label_names" not in overrides:
            kwargs["label_names"] = None
        return cls(**kwargs)

    def to_hf(self) -> Any:
        """The equivalent `transformers.BertConfig` (imports transformers lazily)."""
        import transformers

        labels = self.label_names or tuple(f"LABEL_{i}" for i in range(self.num_labels))
        return transformers.BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            initializer_range=self.initializer_range,
            layer_norm_eps=self.layer_norm_eps,
            classifier_dropout=self.classifier_dropout,
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            problem_type=self.problem_type,
            pad_token_id=self.pad_token_id,
            architectures=["BertForSequenceClassification"],
        )


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        common = dict(std=cfg.initializer_range, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.word_embeddings = Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), **common)
        self.position_embeddings = Embed(cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"), **common)
        self.token_type_embeddings = Embed(cfg.type_vocab_size, cfg.hidden_size, (None, "embed"), **common)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.rate = cfg.hidden_dropout_prob

    def __call__(self, input_ids, token_type_ids, position_ids, key, deterministic):
        x = self.word_embeddings(input_ids, fold(key, NEFTUNE_SITE)) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return dropout(self.LayerNorm(x), self.rate, key, deterministic)


class BertAttention(nnx.Module):
    """Self-attention + output projection + residual LayerNorm (HF's BertAttention as one block)."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        e, h = cfg.hidden_size, cfg.num_attention_heads
        if e % h:
            raise ValueError(f"hidden_size={e} is not a multiple of num_attention_heads={h}")
        d = e // h
        common = dict(use_bias=True, std=cfg.initializer_range, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      rngs=rngs)
        self.query = Dense((e,), (h, d), ("embed", "heads", "kv"), **common)
        self.key = Dense((e,), (h, d), ("embed", "heads", "kv"), **common)
        self.value = Dense((e,), (h, d), ("embed", "heads", "kv"), **common)
        self.output = Dense((h, d), (e,), ("heads", "kv", "embed"), **common)
        self.LayerNorm = LayerNorm(e, cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.attn_rate, self.rate = cfg.attention_probs_dropout_prob, cfg.hidden_dropout_prob

    def __call__(self, x, mask, key, deterministic):
        ctx = attention(self.query(x), self.key(x), self.value(x), mask, dropout_rate=self.attn_rate,
                        key=fold(key, 0), deterministic=deterministic)
        y = dropout(self.output(ctx), self.rate, fold(key, 1), deterministic)
        return self.LayerNorm(y + x)


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        common = dict(use_bias=True, std=cfg.initializer_range, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      rngs=rngs)
        self.attention = BertAttention(cfg, rngs=rngs)
        self.intermediate = Dense((cfg.hidden_size,), (cfg.intermediate_size,), ("embed", "mlp"), **common)
        self.output = Dense((cfg.intermediate_size,), (cfg.hidden_size,), ("mlp", "embed"), **common)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.act = cfg.hidden_act
        self.rate = cfg.hidden_dropout_prob

    def __call__(self, x, mask, key, deterministic):
        x = self.attention(x, mask, fold(key, 0), deterministic)
        y = self.output(_ACTIVATIONS[self.act](self.intermediate(x)))
        return self.LayerNorm(dropout(y, self.rate, fold(key, 1), deterministic) + x)


class BertModel(nnx.Module):
    """Embeddings + encoder + pooler; returns (sequence_output, pooled_output)."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg, rngs=rngs)
        self.layer = ModuleList([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.pooler = Dense((cfg.hidden_size,), (cfg.hidden_size,), ("embed", None), use_bias=True,
                            std=cfg.initializer_range, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
                 key=None, deterministic=True):
        b, s = input_ids.shape
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, s), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(s), (b, s))
        # Bidirectional: only padded keys are hidden; padded queries still produce (ignored) outputs.
        mask = jnp.ones((b, 1, 1, s), bool) if attention_mask is None else (attention_mask[:, None, None, :] != 0)
        x = self.embeddings(input_ids, token_type_ids, position_ids, fold(key, 0), deterministic)

        def run(layer, x, mask, layer_key):
            return layer(x, mask, layer_key, deterministic)

        if self.config.remat:
            run = nnx.remat(run)
        for i, layer in enumerate(self.layer):
            x = run(layer, x, mask, fold(key, i + 1))
        return x, jnp.tanh(self.pooler(x[:, 0]))


class BertForSequenceClassification(nnx.Module):
    """BERT + dropout + linear classifier. `BertForSequenceClassification(config, rngs=nnx.Rngs(0))`.

    Call: `model(input_ids, attention_mask=None, token_type_ids=None, labels=None, *,
    position_ids=None, deterministic=True, rngs=None)` -> dict with "logits" (B, num_labels) and,
    given labels, "loss". With deterministic=False, `rngs` (nnx.Rngs or a PRNG key) drives dropout.
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.bert = BertModel(config, rngs=rngs)
        self.classifier = Dense((config.hidden_size,), (config.num_labels,), ("embed", None), use_bias=True,
                                std=config.initializer_range, dtype=config.dtype,
                                param_dtype=config.param_dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, *, position_ids=None,
                 deterministic: bool = True, rngs=None):
        cfg = self.config
        key = None if deterministic else base_dropout_key(rngs)
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                              key=fold(key, 0), deterministic=deterministic)
        rate = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        logits = self.classifier(dropout(pooled, rate, fold(key, 1), deterministic))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = sequence_classification_loss(logits, labels, cfg.num_labels, cfg.problem_type)
        return out

    def get_input_embeddings(self) -> Embed:
        """The word embedding (transformers' name; a trainer sets NEFTune on it)."""
        return self.bert.embeddings.word_embeddings


def sequence_classification_loss(logits, labels, num_labels: int, problem_type: str | None = None) -> jax.Array:
    """HF's BertForSequenceClassification loss, in float32.

    regression (num_labels == 1 by default): MSE; single_label_classification (integer labels):
    mean cross entropy over labels != -100; multi_label_classification (float labels): BCE-with-logits.
    """
    logits = logits.astype(jnp.float32)
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif jnp.issubdtype(labels.dtype, jnp.integer):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        labels = labels.astype(jnp.float32)
        if num_labels == 1:
            logits, labels = logits.reshape(-1), labels.reshape(-1)
        return jnp.mean(jnp.square(logits - labels))
    if problem_type == "single_label_classification":
        labels = labels.reshape(-1)
        logits = logits.reshape(-1, num_labels)
        valid = labels != -100
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid).astype(jnp.float32)
    if problem_type == "multi_label_classification":
        labels = labels.astype(jnp.float32)
        # log(sigmoid(x)) and log(1 - sigmoid(x)) in their stable forms.
        return jnp.mean(-(labels * jax.nn.log_sigmoid(logits) + (1 - labels) * jax.nn.log_sigmoid(-logits)))
    raise ValueError(f"unknown problem_type={problem_type!r}")
