"""Jitted greedy / beam search of the reference models against transformers' generate, token for token."""

import functools
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
jax = pytest.importorskip("jax")
jnp = jax.numpy

from xtrainer.models import load_hf_llama, load_hf_t5  # noqa: E402
from xtrainer.models.generation import compiled_search, generate, resolve_settings  # noqa: E402

VOCAB = 48


@functools.lru_cache(maxsize=None)
def _t5_pair():
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1,
                                num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
                                relative_attention_num_buckets=8, relative_attention_max_distance=16)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    return hf, load_hf_t5(hf)


@functools.lru_cache(maxsize=None)
def _llama_pair():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=None, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(cfg).eval()
    return hf, load_hf_llama(hf.state_dict(), cfg)


def _source(pad_side="right", pad_id=0):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    if pad_side == "right":
        mask[1, 4:] = 0
        ids[1, 4:] = pad_id
    else:
        mask[1, :3] = 0
        ids[1, :3] = pad_id
    return ids, mask


def _hf(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw).numpy()


def _ours(model, ids, mask, **kw):
    return np.asarray(generate(model, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()), **kw))


def _eos_seen_mid_generation(hf_out, prompt_len):
    """A token HF's greedy output emits at its 3rd new position: as eos it stops that row early."""
    return int(hf_out[0, prompt_len + 2])


def test_t5_greedy_equals_hf_generate():
    hf, model = _t5_pair()
    ids, mask = _source()
    eos = _eos_seen_mid_generation(_hf(hf, ids, mask, max_new_tokens=8, eos_token_id=None), 1)
    kw = dict(max_new_tokens=8, eos_token_id=eos)
    ref = _hf(hf, ids, mask, **kw)
    ours = _ours(model, ids, mask, **kw)
    assert ours.shape == ref.shape and ours[0, 0] == 0  # starts with the decoder start token
    np.testing.assert_array_equal(ours, ref)
    assert (ref[0, 4:] == 0).all()  # the row that hit eos is padded, as in HF


def test_t5_beam_search_equals_hf_generate():
    kw = dict(num_beams=3, max_new_tokens=7, length_penalty=0.5, early_stopping=True, num_return_sequences=2)
    hf, model = _t5_pair()
    ids, mask = _source()
    eos = _eos_seen_mid_generation(_hf(hf, ids, mask, max_new_tokens=8, eos_token_id=None), 1)
    ref = _hf(hf, ids, mask, eos_token_id=eos, **kw)
    ours = _ours(model, ids, mask, eos_token_id=eos, **kw)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


def test_llama_greedy_equals_hf_with_left_and_right_padding():
    hf, model = _llama_pair()
    before = compiled_search._cache_size()
    for side in ("left", "right"):
        ids, mask = _source(side)
        eos = _eos_seen_mid_generation(_hf(hf, ids, mask, max_new_tokens=6, eos_token_id=None, pad_token_id=0), 7)
        kw = dict(max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
        ref = _hf(hf, ids, mask, **kw)
        ours = _ours(model, ids, mask, **kw)
        np.testing.assert_array_equal(ours, ref)
        np.testing.assert_array_equal(ours[:, :7], ids.numpy())  # prompt, then the new tokens
    # Same shapes and settings except eos (static) -> at most one program per eos id, none per call.
    assert compiled_search._cache_size() - before <= 2


def test_llama_beam_search_equals_hf_generate():
    hf, model = _llama_pair()
    ids, mask = _source("left")
    kw = dict(num_beams=2, max_new_tokens=6, pad_token_id=0, eos_token_id=2, early_stopping="never", length_penalty=2.0)
    np.testing.assert_array_equal(_ours(model, ids, mask, **kw), _hf(hf, ids, mask, **kw))


def test_settings_are_validated_and_defaulted_from_the_config():
    _, model = _t5_pair()
    s = resolve_settings(model, 7, {"max_new_tokens": 5})
    assert (s.max_length, s.decoder_start_token_id, s.pad_token_id, s.eos_token_ids) == (6, 0, 0, (1,))
    assert resolve_settings(model, 7, {}).max_length == 20  # HF's default
    with pytest.raises(ValueError, match="top_k"):
        resolve_settings(model, 7, {"top_k": 5})
    with pytest.raises(ValueError, match="do_sample"):
        resolve_settings(model, 7, {"do_sample": True})
    with pytest.raises(ValueError, match="num_return_sequences"):
        resolve_settings(model, 7, {"num_beams": 2, "num_return_sequences": 3})
    _, llama = _llama_pair()
    s = resolve_settings(llama, 7, {"max_new_tokens": 3})
    assert (s.max_length, s.pad_token_id) == (10, 2)  # no pad id: the eos id pads, as in HF
