"""Parity of the NNX T5 with transformers' T5ForConditionalGeneration, HF weight interchange, training."""

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

import xtrainer  # noqa: E402
from xtrainer.models import (  # noqa: E402
    T5Config,
    T5ForConditionalGeneration,
    export_hf_t5,
    from_pretrained,
    load_hf_t5,
    logical_axes,
)
from xtrainer.models.t5 import relative_position_bucket, shift_right  # noqa: E402

VOCAB = 64
_forward = nnx.jit(lambda model, ids, mask, labels: model(ids, mask, labels=labels))


@functools.lru_cache(maxsize=None)
def _hf_model(ff: str, tied: bool):
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=4,
        feed_forward_proj=ff, tie_word_embeddings=tied, decoder_start_token_id=0,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:  # HF initialises norms to 1; random scales make a wrong mapping visible
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
        if not tied:  # a separate head with its own values (transformers 5.2x ties it at init regardless)
            model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 16))
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    # 30 source positions > max_distance: the logarithmic buckets and the clamp are exercised.
    ids = torch.randint(2, VOCAB, (2, 30), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 21:] = 0
    ids[1, 21:] = 0
    labels = torch.randint(2, VOCAB, (2, 25), generator=g)
    labels[0, 19:] = -100
    return ids, mask, labels


@pytest.mark.parametrize("ff,tied", [("relu", True), ("gated-gelu", False)], ids=["relu-tied", "gated-gelu-untied"])
def test_logits_and_loss_match_transformers(ff, tied):
    hf = _hf_model(ff, tied)
    model = load_hf_t5(hf)
    assert model.config.is_gated == (ff == "gated-gelu") and model.config.tie_word_embeddings == tied
    assert (model.lm_head is None) == tied
    ids, mask, labels = _batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    out = _forward(model, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()), jnp.asarray(labels.numpy()))
    np.testing.assert_allclose(np.asarray(out["logits"]), ref.logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(float(out["loss"]), ref.loss.item(), rtol=1e-5)


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 300)
    for bidirectional in (True, False):
        ref = T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional=bidirectional,
                                                    num_buckets=32, max_distance=128).numpy()
        ours = relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional, num_buckets=32,
                                        max_distance=128)
        np.testing.assert_array_equal(np.asarray(ours), ref)


def test_shift_right_replaces_ignored_labels_with_pad():
    labels = jnp.array([[5, 6, -100, -100]])
    np.testing.assert_array_equal(np.asarray(shift_right(labels, 7, 0)), [[7, 5, 6, 0]])


@pytest.mark.parametrize("ff,tied", [("relu", True), ("gated-gelu", False)], ids=["relu-tied", "gated-gelu-untied"])
def test_export_loads_in_transformers_and_round_trips(ff, tied, tmp_path):
    model = load_hf_t5(_hf_model(ff, tied))
    export_hf_t5(model, str(tmp_path))
    assert os.path.exists(tmp_path / "model.safetensors") and os.path.exists(tmp_path / "config.json")
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ids, mask, labels = _batch()
    with torch.no_grad():
        ref = reloaded(input_ids=ids, attention_mask=mask, labels=labels)
    out = _forward(model, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()), jnp.asarray(labels.numpy()))
    np.testing.assert_allclose(np.asarray(out["logits"]), ref.logits.numpy(), atol=1e-4, rtol=0)
    again = from_pretrained(str(tmp_path))
    assert isinstance(again, T5ForConditionalGeneration) and again.config == model.config
    for a, b in zip(jax.tree.leaves(nnx.state(again, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_round_trip_and_validation():
    cfg = T5Config(vocab_size=50, d_model=8, d_kv=2, d_ff=16, num_layers=1, num_decoder_layers=2, num_heads=2,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, eos_token_id=[1, 2])
    assert T5Config.from_hf(cfg.to_hf()) == cfg
    assert cfg.activation == "gelu_new" and cfg.decoder_layers == 2
    with pytest.raises(NotImplementedError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="gated-gelu-x")


def test_logical_axes_annotated():
    cfg = T5Config(vocab_size=50, d_model=8, d_kv=2, d_ff=16, num_layers=1, num_heads=2, tie_word_embeddings=False)
    axes = logical_axes(nnx.eval_shape(lambda: T5ForConditionalGeneration(cfg, rngs=nnx.Rngs(0))))
    assert axes["shared/embedding"] == ("vocab", "embed")
    assert axes["decoder/block/0/cross_attn/q/kernel"] == ("embed", "heads", "kv")
    assert axes["encoder/block/0/self_attn/o/kernel"] == ("heads", "kv", "embed")
    assert axes["encoder/block/0/ff/wi/kernel"] == ("embed", "mlp")
    assert axes["encoder/relative_attention_bias/embedding"] == (None, "heads")
    assert axes["lm_head/kernel"] == ("embed", "vocab")
    assert all(names is not None for names in axes.values())


def copy_task_rows(n=32, length=6, seed=0):
    """Rows whose target is the source: a task a tiny T5 learns in a few steps."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        src = rng.integers(2, 12, size=length)
        rows.append({"input_ids": src.astype(np.int32), "attention_mask": np.ones(length, np.int32),
                     "labels": np.append(src, 1).astype(np.int32)})
    return rows


def test_training_on_the_jax_backend_lowers_the_loss(tmp_path):
    cfg = T5Config(vocab_size=16, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, dropout_rate=0.0,
                   relative_attention_num_buckets=8)
    model = T5ForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax", per_device_train_batch_size=1, max_steps=16,
                                      learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to="none",
                                      disable_tqdm=True, train_sampling_strategy="sequential")
    trainer = xtrainer.Trainer(model=model, args=args, train_dataset=copy_task_rows())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
