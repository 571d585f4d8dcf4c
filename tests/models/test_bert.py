"""Parity of the NNX BERT classifier with transformers' BertForSequenceClassification, and interchange."""

import functools
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
jax = pytest.importorskip("jax")
jnp = jax.numpy
from flax import nnx  # noqa: E402

from xtrainer.models import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    from_pretrained,
    load_hf_bert,
    logical_axes,
    save_pretrained,
    sequence_classification_loss,
    to_hf_state_dict,
)

B, S = 3, 11

# One compiled forward per (model config, input structure); eager op-by-op costs more compile time.
_forward = nnx.jit(lambda model, ids, mask, types, labels: model(ids, mask, types, labels))


@functools.lru_cache(maxsize=None)
def _hf_model(num_labels: int):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, type_vocab_size=2, num_labels=num_labels,
    )
    cfg._attn_implementation = "eager"  # the reference math
    model = transformers.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # HF initialises LayerNorms to (1, 0) and biases to 0; random values expose mapping errors.
            if "LayerNorm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("LayerNorm.weight") else 0.0))
    return model


@pytest.fixture(scope="module", params=[3, 1], ids=["3-class", "regression"])
def pair(request):
    hf = _hf_model(request.param)
    return hf, load_hf_bert(hf.state_dict(), hf.config, strict=True)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 97, size=(B, S))
    mask = np.ones((B, S), np.int64)
    mask[1, -4:] = 0
    mask[2, -1:] = 0
    types = np.zeros((B, S), np.int64)
    types[:, 6:] = 1
    return ids, mask, types


def _labels(num_labels, kind="int"):
    rng = np.random.default_rng(1)
    if num_labels == 1:
        return rng.normal(size=(B,)).astype(np.float32)
    if kind == "multi":
        return rng.integers(0, 2, size=(B, num_labels)).astype(np.float32)
    return np.array([0, 2, -100])  # -100 is ignored by CrossEntropyLoss


def _hf_forward(hf, ids, mask=None, types=None, labels=None):
    hf.config.problem_type = None  # HF caches the inferred problem type on first use
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                 token_type_ids=None if types is None else torch.tensor(types),
                 labels=None if labels is None else torch.tensor(labels))
    return out.logits.numpy(), None if out.loss is None else float(out.loss)


def _ours(model, ids, mask=None, types=None, labels=None):
    conv = (lambda a: None if a is None else jnp.asarray(a))
    out = _forward(model, conv(ids), conv(mask), conv(types), conv(labels))
    return np.asarray(out["logits"]), None if labels is None else float(out["loss"])


def test_logits_match_without_mask(pair, batch):
    hf, model = pair
    ref, _ = _hf_forward(hf, batch[0])
    np.testing.assert_allclose(_ours(model, batch[0])[0], ref, atol=1e-4, rtol=1e-4)


def test_logits_and_loss_match_with_padding(pair, batch):
    hf, model = pair
    ids, mask, types = batch
    labels = _labels(model.config.num_labels)
    ref, ref_loss = _hf_forward(hf, ids, mask, types, labels)
    ours, loss = _ours(model, ids, mask, types, labels)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    if model.config.num_labels > 1:  # float labels -> multi-label BCE, as HF infers
        multi = _labels(model.config.num_labels, "multi")
        _, ref_multi = _hf_forward(hf, ids, mask, types, multi)
        loss_multi = sequence_classification_loss(jnp.asarray(ours), jnp.asarray(multi), model.config.num_labels)
        np.testing.assert_allclose(float(loss_multi), ref_multi, rtol=1e-5)


def test_export_loads_in_transformers_and_round_trips(pair, batch, tmp_path):
    hf, model = pair
    ids, mask, types = batch
    save_pretrained(model, str(tmp_path))
    reloaded_hf = transformers.BertForSequenceClassification.from_pretrained(
        str(tmp_path), attn_implementation="eager").eval()
    ref, _ = _hf_forward(reloaded_hf, ids, mask, types)
    # Same inputs as the padding test, so the compiled forward is reused.
    ours = _ours(model, ids, mask, types, _labels(model.config.num_labels))[0]
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)

    again = from_pretrained(str(tmp_path))
    assert isinstance(again, BertForSequenceClassification) and again.config == model.config
    a, b = to_hf_state_dict(model), to_hf_state_dict(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    for k, v in hf.state_dict().items():
        if k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), v.numpy(), err_msg=k)


def test_config_round_trip():
    hf = _hf_model(3).config
    cfg = BertConfig.from_hf(hf)
    assert (cfg.num_labels, cfg.label_names, cfg.hidden_act) == (3, ("LABEL_0", "LABEL_1", "LABEL_2"), "gelu")
    back = cfg.to_hf()
    for key in ("vocab_size", "hidden_size", "num_labels", "layer_norm_eps", "type_vocab_size", "id2label"):
        assert getattr(back, key) == getattr(hf, key)
    assert BertConfig.from_hf(back.to_dict()) == cfg
    assert BertConfig.from_hf(hf, num_labels=1).label_names is None


def test_dropout_uses_explicit_keys(batch):
    hf = _hf_model(3)
    # A one-layer cut of the checkpoint: dropout sites double the compile time of every layer.
    one_layer = {k: v for k, v in hf.state_dict().items() if ".layer.1." not in k}
    # remat=True also runs the dropout keys through nnx.remat.
    model = load_hf_bert(one_layer, hf.config, strict=True, num_hidden_layers=1, remat=True)
    assert model.config.hidden_dropout_prob == model.config.attention_probs_dropout_prob == 0.1
    ids, mask, types = (jnp.asarray(a) for a in batch)

    @nnx.jit
    def train_forward(m, key):
        return m(ids, mask, types, deterministic=False, rngs=key)["logits"]

    k0, k1 = jax.random.key(0), jax.random.key(1)
    a, b, c = train_forward(model, k0), train_forward(model, k0), train_forward(model, k1)
    np.testing.assert_array_equal(a, b)  # same key, same masks
    assert not np.allclose(a, c)
    # An nnx.Rngs works too (its 'dropout' stream); tracing alone checks the plumbing.
    shape = nnx.eval_shape(lambda m: m(ids, mask, types, deterministic=False, rngs=nnx.Rngs(dropout=1)), model)
    assert shape["logits"].shape == (B, 3)
    with pytest.raises(ValueError, match="dropout needs a key"):
        nnx.eval_shape(lambda m: m(ids, mask, types, deterministic=False), model)


def test_base_checkpoint_loads_with_fresh_head():
    hf = _hf_model(3)
    base = {k: v for k, v in hf.state_dict().items() if not k.startswith(("classifier", "bert.pooler"))}
    base = {k[len("bert."):]: v for k, v in base.items()}  # a bare BertModel checkpoint
    with pytest.warns(UserWarning, match="missing keys"):
        model = load_hf_bert(base, hf.config, rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(np.asarray(to_hf_state_dict(model)["bert.embeddings.word_embeddings.weight"]),
                                  hf.state_dict()["bert.embeddings.word_embeddings.weight"].numpy())
    with pytest.raises(KeyError):
        load_hf_bert(base, hf.config, strict=True)
    axes = logical_axes(model)
    assert axes["bert/layer/0/attention/query/kernel"] == ("embed", "heads", "kv")
    assert axes["classifier/kernel"] == ("embed", None)
