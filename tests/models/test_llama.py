"""Parity of the NNX Llama with transformers' torch LlamaForCausalLM, and HF weight interchange."""

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
    EXAMPLE_RULES,
    LOGICAL_AXIS_NAMES,
    LlamaConfig,
    LlamaForCausalLM,
    causal_lm_loss,
    from_pretrained,
    load_hf_llama,
    logical_axes,
    logical_partition_specs,
    save_pretrained,
    to_hf_state_dict,
)

B, S = 2, 11

# One compiled forward per (model config, mask present or not): op-by-op eager execution of even a
# tiny model costs more compile time than jitting the whole forward once.
_forward = nnx.jit(lambda model, ids, mask, labels: model(ids, mask, labels))


@functools.lru_cache(maxsize=None)
def _hf_model(tied: bool, bias: bool):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, attention_bias=bias,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    # Eager attention is the reference math; torch SDPA treats fully masked (left-padded) query rows
    # differently, and those rows feed the loss at the position just before the first real token.
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # HF initialises norms to 1 and biases to 0; random values make a wrong mapping visible.
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model


@pytest.fixture(scope="module", params=[(False, True), (True, False)], ids=["untied-bias", "tied"])
def pair(request):
    tied, bias = request.param
    hf = _hf_model(tied, bias)
    return hf, load_hf_llama(hf.state_dict(), hf.config)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 97, size=(B, S))
    mask = np.ones((B, S), np.int64)
    mask[0, :3] = 0  # left padding
    mask[1, -2:] = 0  # right padding
    labels = ids.copy()
    labels[mask == 0] = -100
    return ids, mask, labels


def _hf_forward(hf, ids, mask=None, labels=None, **kw):
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                 labels=None if labels is None else torch.tensor(labels), **kw)
    return out.logits.numpy(), None if out.loss is None else float(out.loss)


def _ours(model, ids, mask, labels):
    out = _forward(model, jnp.asarray(ids), None if mask is None else jnp.asarray(mask), jnp.asarray(labels))
    return np.asarray(out["logits"]), float(out["loss"])


def test_logits_and_loss_match_without_mask(pair, batch):
    hf, model = pair
    ids, _, _ = batch
    ref, ref_loss = _hf_forward(hf, ids, labels=ids)
    ours, loss = _ours(model, ids, None, ids)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)


def test_logits_and_loss_match_with_padding(pair, batch):
    hf, model = pair
    ids, mask, labels = batch
    ref, ref_loss = _hf_forward(hf, ids, mask, labels)
    ours, loss = _ours(model, ids, mask, labels)
    keep = mask.astype(bool)  # outputs at padded positions are not compared
    np.testing.assert_allclose(ours[keep], ref[keep], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    # Gradient-accumulation form: sum / num_items_in_batch, and shift_labels given directly.
    _, ref_n = _hf_forward(hf, ids, mask, labels, num_items_in_batch=torch.tensor(40))
    loss_n = causal_lm_loss(jnp.asarray(ours), jnp.asarray(labels), num_items_in_batch=40)
    np.testing.assert_allclose(float(loss_n), ref_n, rtol=1e-5)
    shifted = np.concatenate([labels[:, 1:], np.full((B, 1), -100)], axis=1)
    np.testing.assert_allclose(float(causal_lm_loss(jnp.asarray(ours), shift_labels=jnp.asarray(shifted))),
                               loss, rtol=1e-6)


def test_export_loads_in_transformers_and_round_trips(pair, batch, tmp_path):
    hf, model = pair
    ids, mask = batch[:2]
    save_pretrained(model, str(tmp_path))
    reloaded_hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ours, _ = _ours(model, ids, mask, batch[2])
    ref, _ = _hf_forward(reloaded_hf, ids, mask)
    keep = mask.astype(bool)
    np.testing.assert_allclose(ours[keep], ref[keep], atol=1e-4, rtol=1e-4)

    # import(export(model)) is exact, and so is export(import(torch state dict)).
    again = from_pretrained(str(tmp_path))
    assert isinstance(again, LlamaForCausalLM) and again.config == model.config
    a, b = to_hf_state_dict(model), to_hf_state_dict(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    for k, v in hf.state_dict().items():
        if k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), v.numpy(), err_msg=k)
    assert ("lm_head.weight" in a) == (not model.config.tie_word_embeddings)


def test_config_round_trip():
    hf = _hf_model(tied=True, bias=False).config
    cfg = LlamaConfig.from_hf(hf, dtype=jnp.bfloat16, remat=True)
    assert (cfg.kv_heads, cfg.head_size, cfg.rope_theta, cfg.tie_word_embeddings) == (2, 8, 500.0, True)
    assert cfg.dtype == jnp.bfloat16 and cfg.remat
    back = cfg.to_hf()
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps"):
        assert getattr(back, key) == getattr(hf, key)
    assert LlamaConfig.from_hf(back.to_dict(), dtype=jnp.bfloat16, remat=True) == cfg
    with pytest.raises(NotImplementedError):
        LlamaConfig.from_hf({**hf.to_dict(), "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})


def test_logical_axes_annotated():
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    # Abstract construction keeps the metadata and skips compiling random initialisers.
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    axes = logical_axes(model)
    assert axes["model/layers/0/self_attn/q_proj/kernel"] == ("embed", "heads", "kv")
    assert axes["model/layers/0/self_attn/k_proj/kernel"] == ("embed", "kv_heads", "kv")
    assert axes["lm_head/kernel"] == ("embed", "vocab")
    assert all(n in LOGICAL_AXIS_NAMES for names in axes.values() for n in names)
    specs = logical_partition_specs(model, EXAMPLE_RULES)
    assert tuple(specs["model"]["layers"][0]["mlp"]["down_proj"]["kernel"]) == ("tensor", "fsdp")
    # flax's own helper sees the same names.
    flax_spec = nnx.get_partition_spec(nnx.state(model))["model"]["norm"]["scale"]
    assert [tuple(p) for p in jax.tree.leaves(flax_spec)] == [("norm",)]


def test_remat_grads_match_torch(batch):
    hf = _hf_model(tied=False, bias=True)
    model = load_hf_llama(hf.state_dict(), hf.config, remat=True)
    assert model.config.remat
    ids, mask, labels = (a.copy() for a in batch)
    # No left padding here: a fully masked query row gets uniform attention in both, but torch's
    # additive mask still passes (meaningless) gradients through the swamped scores; ours does not.
    mask[0], labels[0] = 1, ids[0]

    @nnx.jit
    def value_and_grad(m, ids, mask, labels):
        return nnx.value_and_grad(lambda m: m(ids, mask, labels)["loss"])(m)

    loss, grads = value_and_grad(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(labels))
    hf.zero_grad()
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss
    ref.backward()
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
    # Grads share the params' structure, so the exporter names them like HF's parameters.
    named = to_hf_state_dict(nnx.merge(nnx.graphdef(model), grads))
    for name, p in hf.named_parameters():
        np.testing.assert_allclose(np.asarray(named[name]), p.grad.numpy(), atol=2e-5, rtol=1e-3, err_msg=name)
    hf.zero_grad(set_to_none=True)
