"""Jitted greedy and beam-search decoding for the reference NNX models.

Owns: `GenerationSettings` (HF-style generation kwargs, validated and made static),
`greedy_search`, `beam_search` and `generate`, which returns ids exactly as transformers'
`model.generate` does (encoder-decoder: starting with the decoder start token; decoder-only: the
prompt followed by the new tokens; finished rows padded with pad_token_id; trimmed to the longest
row).

How it runs: the whole search is one jitted program per (model graph, input shape, settings):
a `lax.while_loop` over a fixed-size token buffer of `max_length` columns, which stops as soon as
every row is done without changing shapes. An encoder-decoder model's encoder runs once, before
the loop. Models with `init_decode_cache`/`decode_step` (the NNX T5) then feed one token per step
against a fixed-size KV cache (reordered with the hypotheses in beam search). Other models, and
use_cache=False, run the decoder over the whole buffer each step and read the logits at the
current position (later positions are causally masked, so they do not change them): simpler, one
full decoder pass per step, fine at reference-model sizes. Either way one compile serves all steps.

Model protocol: an encoder-decoder model exposes `encode(input_ids, attention_mask)` and
`decode(decoder_input_ids, encoder_hidden, encoder_attention_mask) -> logits` (the NNX T5); a
decoder-only model is called as `model(input_ids, attention_mask, position_ids=...)` and returns
{"logits": ...} (the NNX Llama). Position ids follow HF's generate: cumulative count of the
attention mask minus one (0 on padding), and new tokens continue from the last prompt column, so
left- and right-padded prompts give HF's tokens.

Beam search follows transformers' vectorised beam search (top 2K candidates per step, finished
hypotheses scored with sum_logprobs / generated_len**length_penalty, the same early-stopping
heuristic for early_stopping=False/True/"never").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

_NEG = -1.0e9  # HF's "impossible" score; finite so sums stay ordered
# Keys that only tune how HF runs generate, not what it returns.
# (transformers_version / _from_model_config: metadata of a GenerationConfig's to_diff_dict().)
_IGNORED_KEYS = frozenset({"synced_gpus", "output_scores", "return_dict_in_generate",
                           "transformers_version", "_from_model_config", "_commit_hash"})
_SUPPORTED_KEYS = frozenset({
    "max_length", "max_new_tokens", "num_beams", "do_sample", "decoder_start_token_id", "eos_token_id",
    "pad_token_id", "bos_token_id", "length_penalty", "early_stopping", "num_return_sequences", "use_cache",
})


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Static generation settings (hashable: one compiled program per distinct value).

    max_length counts every output column (decoder start token or prompt included), as in HF.
    """

    max_length: int
    num_beams: int = 1
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    decoder_start_token_id: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    use_cache: bool = True


def is_encoder_decoder(model: Any) -> bool:
    """True for models exposing the encode/decode protocol (see the module docstring)."""
    return callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))


def _as_tuple(ids: Any) -> tuple[int, ...]:
    if ids is None:
        return ()
    return tuple(int(i) for i in ids) if isinstance(ids, (list, tuple)) else (int(ids),)


def resolve_settings(model: Any, prompt_len: int, gen_kwargs: Mapping[str, Any] | None = None) -> GenerationSettings:
    """HF-style generation kwargs -> GenerationSettings, with defaults from `model.config`.

    Raises ValueError for an unsupported key (naming it), sampling, or a max_length that leaves no
    room to generate. Defaults as HF's GenerationConfig: max_length=20, greedy, length_penalty=1.0,
    early_stopping=False; pad_token_id falls back to the first eos id, as HF does.
    """
    kwargs = {k: v for k, v in dict(gen_kwargs or {}).items() if k not in _IGNORED_KEYS and v is not None}
    unknown = sorted(set(kwargs) - _SUPPORTED_KEYS)
    if unknown:
        raise ValueError(f"generation setting(s) {unknown} not supported by xtrainer's JAX generation; "
                         f"supported: {sorted(_SUPPORTED_KEYS)}")
    if kwargs.get("do_sample"):
        raise ValueError("do_sample=True is not supported: only greedy and beam search are implemented")
    cfg = getattr(model, "config", None)
    enc_dec = is_encoder_decoder(model)
    eos = _as_tuple(kwargs.get("eos_token_id", getattr(cfg, "eos_token_id", None)))
    pad = kwargs.get("pad_token_id", getattr(cfg, "pad_token_id", None))
    if pad is None:
        if not eos:
            raise ValueError("generation needs pad_token_id or eos_token_id (model config or gen_kwargs)")
        pad = eos[0]
    start = None
    if enc_dec:
        start = kwargs.get("decoder_start_token_id", getattr(cfg, "decoder_start_token_id", None))
        if start is None:
            start = kwargs.get("bos_token_id", getattr(cfg, "bos_token_id", None))
        if start is None:
            raise ValueError("an encoder-decoder model needs decoder_start_token_id (config or gen_kwargs)")
    decoder_prompt = 1 if enc_dec else prompt_len
    if "max_new_tokens" in kwargs:
        max_length = decoder_prompt + int(kwargs["max_new_tokens"])
    else:
        max_length = int(kwargs.get("max_length", 20))
    if max_length <= decoder_prompt:
        raise ValueError(f"max_length={max_length} leaves no room to generate after {decoder_prompt} prompt column(s); "
                         "raise max_length or set max_new_tokens")
    num_beams = int(kwargs.get("num_beams", 1))
    num_return = int(kwargs.get("num_return_sequences", 1))
    if num_beams < 1 or num_return > num_beams:
        raise ValueError(f"num_return_sequences={num_return} must be <= num_beams={num_beams} (>= 1)")
    early = kwargs.get("early_stopping", False)
    if early not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early!r}")
    return GenerationSettings(
        max_length=max_length, num_beams=num_beams, eos_token_ids=eos, pad_token_id=int(pad),
        decoder_start_token_id=None if start is None else int(start),
        length_penalty=float(kwargs.get("length_penalty", 1.0)), early_stopping=early,
        num_return_sequences=num_return, use_cache=bool(kwargs.get("use_cache", True)))


# ---------------------------------------------------------------------------------------------- model steps


def _prompt_mask(input_ids, attention_mask, s: GenerationSettings):
    if attention_mask is not None:
        return attention_mask.astype(jnp.int32)
    # HF infers the mask from padding only when pad is present and is not an eos token.
    ones = jnp.ones_like(input_ids, jnp.int32)
    if s.pad_token_id in s.eos_token_ids:
        return ones
    is_pad = input_ids == s.pad_token_id
    return jnp.where(jnp.any(is_pad), (~is_pad).astype(jnp.int32), ones)


def _make_step(model, input_ids, mask, s: GenerationSettings, expand: int, fill: int):
    """The model side of a search, for N = batch * expand rows.

    Returns (token buffer (N, L) filled with `fill` after the prompt, prompt length, initial cache,
    step(buffer, cur_len, cache) -> (next-token logits (N, V) float32, cache), reorder(cache, rows)).
    `reorder` makes row i of the cache follow row rows[i] (beam search moves hypotheses between beams).
    """
    b, p = input_ids.shape
    n, length = b * expand, s.max_length

    def rep(x):  # HF's repeat_interleave: the beams of one example are adjacent rows
        return jnp.repeat(x, expand, axis=0)

    def at(logits, cur_len):
        return jax.lax.dynamic_index_in_dim(logits, cur_len - 1, axis=1, keepdims=False).astype(jnp.float32)

    if is_encoder_decoder(model):
        enc_mask = rep(mask)
        enc = rep(model.encode(input_ids, mask))
        tokens = jnp.full((n, length), fill, jnp.int32).at[:, 0].set(s.decoder_start_token_id)
        if s.use_cache and callable(getattr(model, "decode_step", None)):
            def cached_step(buffer, cur_len, cache):
                token = jax.lax.dynamic_index_in_dim(buffer, cur_len - 1, axis=1, keepdims=False)
                logits, cache = model.decode_step(token, cur_len - 1, cache, enc_mask)
                return logits.astype(jnp.float32), cache

            def reorder(cache, rows):
                # Cross-attention keys/values are the same for every beam of an example: only the
                # self-attention cache follows the hypotheses.
                return {**cache, "self_k": cache["self_k"][:, rows], "self_v": cache["self_v"][:, rows]}

            return tokens, 1, model.init_decode_cache(enc, length), cached_step, reorder

        def step(buffer, cur_len, cache):
            return at(model.decode(buffer, enc, enc_mask), cur_len), cache

        return tokens, 1, None, step, _no_reorder

    mask = rep(mask)
    tokens = jnp.full((n, length), fill, jnp.int32).at[:, :p].set(rep(input_ids.astype(jnp.int32)))
    prompt_pos = jnp.where(mask == 0, 0, jnp.cumsum(mask, axis=-1) - 1)
    new_pos = prompt_pos[:, -1:] + 1 + jnp.arange(length - p)[None]
    positions = jnp.concatenate([prompt_pos, new_pos], axis=-1)
    full_mask = jnp.concatenate([mask, jnp.ones((n, length - p), jnp.int32)], axis=-1)

    def step(buffer, cur_len, cache):
        return at(model(buffer, full_mask, position_ids=positions)["logits"], cur_len), cache

    return tokens, p, None, step, _no_reorder


def _no_reorder(cache, rows):
    return cache


def _is_eos(tokens, s: GenerationSettings):
    if not s.eos_token_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(s.eos_token_ids, tokens.dtype))


# ---------------------------------------------------------------------------------------------- searches


def greedy_search(model, input_ids, attention_mask, s: GenerationSettings):
    """Greedy decoding inside the caller's trace. Returns (tokens (B, max_length), used length)."""
    mask = _prompt_mask(input_ids, attention_mask, s)
    tokens, prompt_len, cache, step, _ = _make_step(model, input_ids, mask, s, 1, s.pad_token_id)

    def cond(carry):
        _, cur_len, unfinished, _ = carry
        return (cur_len < s.max_length) & jnp.any(unfinished)

    def body(carry):
        tokens, cur_len, unfinished, cache = carry
        logits, cache = step(tokens, cur_len, cache)
        next_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        next_tok = jnp.where(unfinished, next_tok, s.pad_token_id)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, next_tok[:, None], cur_len, axis=1)
        return tokens, cur_len + 1, unfinished & ~_is_eos(next_tok, s), cache

    init = (tokens, jnp.int32(prompt_len), jnp.ones((tokens.shape[0],), bool), cache)
    tokens, cur_len, _, _ = jax.lax.while_loop(cond, body, init)
    return tokens, cur_len


def _gather(x, idx):
    """x (B, M, ...) gathered along axis 1 by idx (B, K)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(model, input_ids, attention_mask, s: GenerationSettings):
    """Beam search inside the caller's trace (HF's algorithm, see the module docstring).

    Returns (tokens (B * num_return_sequences, max_length), used length).
    """
    b, k = input_ids.shape[0], s.num_beams
    mask = _prompt_mask(input_ids, attention_mask, s)
    # transformers fills beam buffers with `pad_token_id or eos_token_id[0]`: a pad id of 0 is falsy
    # there, so finished hypotheses are padded with the first eos id instead. Kept for identical output.
    fill = (s.pad_token_id or s.eos_token_ids[0]) if s.eos_token_ids else -1
    flat_tokens, prompt_len, cache, step, reorder = _make_step(model, input_ids, mask, s, k, fill)
    length = s.max_length
    keep = max(2, 1 + len(s.eos_token_ids)) * k
    top_beam = jnp.arange(keep) < k
    lp = s.length_penalty

    def cond(c):
        return c["go"]

    def body(c):
        cur_len = c["cur_len"]
        logits, cache = step(c["running"].reshape(b * k, length), cur_len, c["cache"])
        logp = jax.nn.log_softmax(logits, axis=-1)
        vocab = logp.shape[-1]
        logp = (logp.reshape(b, k, vocab) + c["running_scores"][:, :, None]).reshape(b, k * vocab)
        topk_lp, topk_idx = jax.lax.top_k(logp, keep)
        topk_seq = _gather(c["running"], topk_idx // vocab)
        tok = (topk_idx % vocab).astype(jnp.int32)
        topk_seq = jax.lax.dynamic_update_slice_in_dim(topk_seq, tok[:, :, None], cur_len, axis=2)
        hits = _is_eos(tok, s) | (cur_len + 1 >= length)

        # Beams that continue: the best k candidates that did not just stop.
        running_lp = topk_lp + hits.astype(jnp.float32) * _NEG
        nxt = jax.lax.top_k(running_lp, k)[1]
        running, running_scores = _gather(topk_seq, nxt), _gather(running_lp, nxt)
        source_beam = _gather(topk_idx // vocab, nxt)  # (B, K): the beam each new hypothesis extends
        cache = reorder(cache, (source_beam + jnp.arange(b)[:, None] * k).reshape(-1))

        # Finished hypotheses: merge the new ones (only from the top k candidates) with the kept ones.
        gen_len = cur_len + 1 - prompt_len
        just_finished = hits & top_beam[None]
        scores = topk_lp / (gen_len.astype(jnp.float32) ** lp)
        if s.early_stopping is True:
            scores += jnp.all(c["finished"], axis=-1, keepdims=True).astype(jnp.float32) * _NEG
        scores += (~c["improvable"]).astype(jnp.float32) * _NEG
        scores += (~just_finished).astype(jnp.float32) * _NEG
        merged_scores = jnp.concatenate([c["beam_scores"], scores], axis=1)
        best = jax.lax.top_k(merged_scores, k)[1]
        sequences = _gather(jnp.concatenate([c["sequences"], topk_seq], axis=1), best)
        beam_scores = _gather(merged_scores, best)
        finished = _gather(jnp.concatenate([c["finished"], just_finished], axis=1), best)
        lengths = _gather(jnp.concatenate([c["lengths"], jnp.broadcast_to(gen_len, tok.shape)], axis=1), best)

        cur_len = cur_len + 1
        if s.early_stopping == "never" and lp > 0.0:
            best_len = jnp.float32(length - prompt_len)
        else:
            best_len = (cur_len - prompt_len).astype(jnp.float32)
        best_running = running_scores[:, :1] / best_len ** lp
        worst_finished = jnp.where(finished, jnp.min(beam_scores, axis=1, keepdims=True), _NEG)
        improvable = c["improvable"] & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
        go = jnp.any(improvable) & ~jnp.all(hits)
        if s.early_stopping is True:
            go &= ~jnp.all(finished)
        return dict(cur_len=cur_len, running=running, running_scores=running_scores, sequences=sequences,
                    beam_scores=beam_scores, finished=finished, lengths=lengths, improvable=improvable, go=go,
                    cache=cache)

    running = flat_tokens.reshape(b, k, length)
    init = dict(
        cur_len=jnp.int32(prompt_len),
        running=running,
        running_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(_NEG),
        sequences=running,
        beam_scores=jnp.full((b, k), _NEG, jnp.float32),
        finished=jnp.zeros((b, k), bool),
        lengths=jnp.zeros((b, k), jnp.int32),
        improvable=jnp.ones((b, 1), bool),
        go=jnp.bool_(True),
        cache=cache,
    )
    out = jax.lax.while_loop(cond, body, init)
    r = s.num_return_sequences
    used = prompt_len + jnp.max(out["lengths"][:, :r])
    return out["sequences"][:, :r].reshape(b * r, length), used


# ---------------------------------------------------------------------------------------------- entry points


def _search(graphdef, states, input_ids, attention_mask, settings: GenerationSettings):
    model = nnx.merge(graphdef, *states)
    search = beam_search if settings.num_beams > 1 else greedy_search
    return search(model, input_ids, attention_mask, settings)


# One compiled program per (graph definition, shapes, settings): jit's own cache keys on all three.
compiled_search = jax.jit(_search, static_argnums=(0, 4))


def generate_padded(model, input_ids, attention_mask=None, **gen_kwargs):
    """Like `generate` but without a host sync: (tokens (B*R, max_length), used length) on device."""
    input_ids = jnp.asarray(input_ids)
    settings = resolve_settings(model, input_ids.shape[1], gen_kwargs)
    graphdef, *states = nnx.split(model, nnx.Param, ...)
    mask = None if attention_mask is None else jnp.asarray(attention_mask)
    return compiled_search(graphdef, tuple(states), input_ids, mask, settings)


def generate(model, input_ids, attention_mask=None, **gen_kwargs) -> jax.Array:
    """Token ids as `transformers` `model.generate(input_ids, attention_mask=..., **gen_kwargs)` returns them.

    Args:
        model: an NNX reference model (T5ForConditionalGeneration, LlamaForCausalLM, or any model
            following the protocol in the module docstring); it is not modified.
        input_ids, attention_mask: (B, S) prompt (decoder-only) or encoder input (encoder-decoder).
        gen_kwargs: max_length / max_new_tokens, num_beams, length_penalty, early_stopping,
            num_return_sequences, eos_token_id, pad_token_id, decoder_start_token_id (defaults from
            model.config); do_sample=True and other keys raise ValueError.
    Returns:
        int32 (B * num_return_sequences, L) with L the longest generated row (one host sync).

    Example:
        >>> ids = generate(t5, input_ids, attention_mask, max_new_tokens=16, num_beams=4)
    """
    tokens, used = generate_padded(model, input_ids, attention_mask, **gen_kwargs)
    return tokens[:, : int(used)]
