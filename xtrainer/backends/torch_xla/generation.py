"""Static-shape generation for encoder-decoder models on torch_xla (greedy and beam search).

transformers' `generate` grows its decoder inputs by one token per step and reads the stop condition
on the host every step; under torch_xla each new length is a new graph, so decoding compiles once
per step (and again for every batch that stops at another length). Here decoding keeps every shape
fixed:

- The encoder runs once per batch.
- The decoder input is a preallocated `[rows * beams, capacity]` buffer (capacity: `max_length`
  rounded up to a power of two, so calls with different `max_length`s share graphs). Each step runs
  the decoder over the whole buffer; causal attention keeps the unwritten tail from influencing the
  current position, whose logits are picked with a device index (`cur_len`), not a Python int.
- The current length, the max length and the stop flag are device scalars. A step whose stop flag
  is already set leaves every tensor unchanged, so each step is the same graph, cut by
  `torch_xla.sync()`; the host reads the stop flag only every few steps.
- The result is trimmed on the host to the length transformers' loop would have stopped at.

Selection follows transformers' greedy search and its vectorised beam search (top 2K continuations,
finished hypotheses scored with the length penalty, the early-stopping heuristic, and its stop
conditions), so on the same weights the tokens equal `model.generate`'s, padding and fill values
included.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..torch.generation import generation_inputs

#: Generation-config fields whose non-default values this decoder cannot honour, with their neutral value.
_NEUTRAL = {
    "do_sample": False,
    "num_return_sequences": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "constraints": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "return_dict_in_generate": False,
    "output_scores": False,
    "output_logits": False,
    "guidance_scale": None,
    "penalty_alpha": None,
    "prompt_lookup_num_tokens": None,
    "assistant_model": None,
    "stop_strings": None,
    "watermarking_config": None,
}
#: gen kwargs accepted without effect on the result (they steer transformers' own loop only).
_IGNORED_KWARGS = {"synced_gpus", "use_cache", "cache_implementation", "output_attentions", "output_hidden_states"}
_GLOBAL_DEFAULT_MAX_LENGTH = 20
_NEG = -1.0e9  # transformers' "never pick this" score


@dataclass(frozen=True)
class GenerationSettings:
    """What one generate call decodes with (resolved like transformers' generate)."""

    max_length: int  # total decoder length, decoder start token included
    num_beams: int
    decoder_start_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    length_penalty: float
    early_stopping: bool | str

    @property
    def fill_value(self) -> int:
        """The value of unwritten buffer positions (transformers' beam search: pad, else eos, else -1)."""
        if not self.eos_token_ids:
            return -1
        return self.pad_token_id or self.eos_token_ids[0]


def resolve_settings(model: nn.Module, generation_config: Any, gen_kwargs: dict) -> GenerationSettings:
    """Merges gen kwargs over the model's generation config over transformers' defaults.

    Args:
        model: the model (its config supplies decoder_start_token_id and max_position_embeddings).
        generation_config: the model's `GenerationConfig` (or None).
        gen_kwargs: HF-style generate kwargs; an unsupported one raises a ValueError naming it.
    """
    from transformers import GenerationConfig

    user_max_length = gen_kwargs.get("max_length")
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    has_default_max_length = user_max_length is None and config.max_length is None
    config.update(**config._get_default_generation_params(), defaults_only=True)
    kwargs = {k: v for k, v in gen_kwargs.items() if k not in _IGNORED_KWARGS}
    unused = config.update(**kwargs)
    if unused:
        raise ValueError(
            f"backend='torch_xla' static generation does not support the generate argument(s) {sorted(unused)}."
        )
    for name, neutral in _NEUTRAL.items():
        value = getattr(config, name, neutral)
        if value != neutral and not (value is None and neutral in (0, 1, 0.0, 1.0, False)):
            raise ValueError(
                f"backend='torch_xla' static generation does not support {name}={value!r} (only {neutral!r}); "
                "use backend='torch' for it."
            )
    model_config = getattr(model, "config", None)
    start = config.decoder_start_token_id
    if start is None:
        start = getattr(model_config, "decoder_start_token_id", None)
    if start is None:
        start = config.bos_token_id
    if start is None:
        raise ValueError("generation needs a decoder_start_token_id (in the generation config or the model config).")
    eos = config.eos_token_id
    eos = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    pad = config.pad_token_id
    if pad is None and eos:
        pad = eos[0]  # transformers pads finished sequences with the first eos token then
    # Total decoder length, the decoder start token included (transformers' _prepare_generated_length).
    if config.max_new_tokens is not None:
        max_length = config.max_new_tokens + 1
    elif has_default_max_length:
        max_length = config.max_length + 1
        limit = getattr(model_config, "max_position_embeddings", None)
        if isinstance(limit, int):
            max_length = min(max_length, limit)
    else:
        max_length = config.max_length
    return GenerationSettings(
        max_length=int(max_length),
        num_beams=int(config.num_beams or 1),
        decoder_start_token_id=int(start),
        eos_token_ids=eos,
        pad_token_id=None if pad is None else int(pad),
        length_penalty=float(config.length_penalty),
        early_stopping=config.early_stopping,
    )


def buffer_capacity(max_length: int, minimum: int = 8) -> int:
    """The decoder buffer length for `max_length`: the next power of two (at least `minimum`)."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(max_length, 1)))))


class _Decoder:
    """Runs the decoder over the fixed-size buffer and returns the logits at position cur_len - 1."""

    def __init__(self, model: nn.Module, encoder_outputs, attention_mask):
        self.model, self.encoder_outputs, self.attention_mask = model, encoder_outputs, attention_mask

    def next_logits(self, buffer: torch.Tensor, cur_len: torch.Tensor) -> torch.Tensor:
        out = self.model(
            encoder_outputs=self.encoder_outputs,
            attention_mask=self.attention_mask,
            decoder_input_ids=buffer,
            use_cache=False,
            return_dict=True,
        )
        logits = out.logits
        index = (cur_len - 1).reshape(1, 1, 1).expand(logits.shape[0], 1, logits.shape[-1])
        return logits.gather(1, index).squeeze(1).float()


def _keep(stopped: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`new`, unless decoding has stopped (then `old`): a stopped step changes nothing."""
    return torch.where(stopped, old, new)


def _is_eos(tokens: torch.Tensor, eos: torch.Tensor | None) -> torch.Tensor:
    if eos is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return (tokens.unsqueeze(-1) == eos).any(-1)


def static_generate(
    model: nn.Module, batch: dict, settings: GenerationSettings, *, real_rows: int, sync, to_cpu=None, check_every: int = 4
) -> torch.Tensor:
    """Generates for one (possibly row-padded) device batch; returns CPU int64 ids [real_rows, length].

    Args:
        model: an encoder-decoder transformers model on the XLA device (`get_encoder()` and a forward
            taking `encoder_outputs`).
        batch: device tensors of one eval batch (`input_ids`, optional `attention_mask`).
        settings: see `resolve_settings`.
        real_rows: how many leading rows are real (the rest are static-shape padding, ignored by the
            stop conditions and cut off the result).
        sync: cuts and dispatches the pending lazy graph (torch_xla.sync).
        to_cpu: device tensors -> CPU tensors in one transfer (the SPMD-aware one: no gather graph for
            sharded results); default `.cpu()` each.
        check_every: steps between host reads of the stop flag.
    """
    inputs = generation_inputs(batch)
    input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
    device, rows, beams = input_ids.device, input_ids.shape[0], settings.num_beams
    capacity = buffer_capacity(settings.max_length)
    # Data the graphs read (transferred, never baked into a graph as constants).
    padded_row = torch.arange(rows) >= real_rows
    scalars = {
        "cur_len": torch.tensor(1, dtype=torch.int64),
        "max_len": torch.tensor(settings.max_length, dtype=torch.int64),
        "stopped": torch.tensor(False),
    }
    eos = torch.tensor(settings.eos_token_ids, dtype=torch.int64).to(device) if settings.eos_token_ids else None
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        if beams > 1:  # each row's encoder states serve all its beams (transformers' repeat_interleave)
            encoder_outputs["last_hidden_state"] = encoder_outputs.last_hidden_state.repeat_interleave(beams, dim=0)
            attention_mask = attention_mask.repeat_interleave(beams, dim=0) if attention_mask is not None else None
        decoder = _Decoder(model, encoder_outputs, attention_mask)
        run = _beam_search if beams > 1 else _greedy_search
        sequences, lengths = run(decoder, settings, rows, capacity, padded_row, scalars, eos, device, sync, check_every)
    sequences, lengths = (to_cpu or (lambda ts: [t.cpu() for t in ts]))([sequences, lengths])
    lengths = lengths.reshape(-1).expand(rows)  # greedy: one length for all rows
    length = max(1, int(lengths[:real_rows].max())) if real_rows else 1
    return sequences[:real_rows, :length]


def _steps(settings: GenerationSettings, stopped: torch.Tensor, sync, check_every: int):
    """Yields once per decoding step (at most max_length - 1), stopping early once the device says so."""
    for step in range(settings.max_length - 1):
        yield step
        sync()
        if (step + 1) % check_every == 0 and bool(stopped().cpu()):
            return


def _greedy_search(decoder, settings, rows, capacity, padded_row, scalars, eos, device, sync, check_every):
    buffer = torch.full((rows, capacity), settings.pad_token_id if settings.pad_token_id is not None else 0, dtype=torch.int64)
    buffer[:, 0] = settings.decoder_start_token_id
    buffer = buffer.to(device)
    finished = padded_row.to(device)  # padding rows count as finished from the start
    cur_len, max_len, stopped = (scalars[k].to(device) for k in ("cur_len", "max_len", "stopped"))
    pad = settings.pad_token_id
    sync()
    state = {"stopped": stopped}
    for _ in _steps(settings, lambda: state["stopped"], sync, check_every):
        stopped = state["stopped"]
        tokens = decoder.next_logits(buffer, cur_len).argmax(-1)
        if pad is not None:
            tokens = torch.where(finished, torch.full_like(tokens, pad), tokens)
        position = cur_len.reshape(1, 1).expand(rows, 1)
        new_buffer = buffer.scatter(1, position, tokens.unsqueeze(1))
        new_finished = finished | _is_eos(tokens, eos)
        new_len = cur_len + 1
        done = new_finished.all() | (new_len >= max_len)
        buffer = _keep(stopped, buffer, new_buffer)
        finished = _keep(stopped, finished, new_finished)
        cur_len = _keep(stopped, cur_len, new_len)
        state["stopped"] = stopped | done
    return buffer, cur_len


def _beam_search(decoder, settings, rows, capacity, padded_row, scalars, eos, device, sync, check_every):
    beams, penalty, early = settings.num_beams, settings.length_penalty, settings.early_stopping
    keep = max(2, 1 + len(settings.eos_token_ids)) * beams  # candidates kept per row (transformers' rule)
    running = torch.full((rows, beams, capacity), settings.fill_value, dtype=torch.int64)
    running[:, :, 0] = settings.decoder_start_token_id
    running_scores = torch.zeros((rows, beams), dtype=torch.float32)
    running_scores[:, 1:] = _NEG
    running, running_scores = running.to(device), running_scores.to(device)
    sequences = running.clone()
    scores = torch.full((rows, beams), _NEG, dtype=torch.float32, device=device)
    lengths = torch.zeros((rows, beams), dtype=torch.int64, device=device)
    finished = torch.zeros((rows, beams), dtype=torch.bool, device=device)
    padded = padded_row.to(device)
    improvable = (~padded).unsqueeze(1)  # the early-stop heuristic; padding rows never need more steps
    top_beams = (torch.arange(keep) < beams).to(device)
    cur_len, max_len, stopped = (scalars[k].to(device) for k in ("cur_len", "max_len", "stopped"))
    sync()
    state = {"stopped": stopped}
    for _ in _steps(settings, lambda: state["stopped"], sync, check_every):
        stopped = state["stopped"]
        log_probs = nn.functional.log_softmax(decoder.next_logits(running.reshape(rows * beams, capacity), cur_len), dim=-1)
        vocab = log_probs.shape[-1]
        log_probs = (log_probs.reshape(rows, beams, vocab) + running_scores.unsqueeze(-1)).reshape(rows, beams * vocab)
        top_scores, top_index = torch.topk(log_probs, k=keep)
        source_beam, tokens = top_index // vocab, top_index % vocab
        candidates = torch.take_along_dim(running, source_beam.unsqueeze(-1), dim=1)
        position = cur_len.reshape(1, 1, 1).expand(rows, keep, 1)
        candidates = candidates.scatter(2, position, tokens.unsqueeze(-1))
        hits = _is_eos(tokens, eos) | (cur_len + 1 >= max_len)
        # Beams that continue: the best `beams` candidates that did not just stop.
        live_scores = top_scores + hits.float() * _NEG
        live = torch.topk(live_scores, k=beams)[1]
        new_running = torch.take_along_dim(candidates, live.unsqueeze(-1), dim=1)
        new_running_scores = torch.take_along_dim(live_scores, live, dim=1)
        # Finished hypotheses: the top `beams` candidates that stopped, scored with the length penalty.
        just_finished = hits & top_beams.unsqueeze(0)
        final_scores = top_scores / (cur_len.float() ** penalty)
        full = finished.all(-1, keepdim=True) & (early is True)
        final_scores = final_scores + full.float() * _NEG + (~improvable).float() * _NEG + (~just_finished).float() * _NEG
        merged_scores = torch.cat((scores, final_scores), dim=1)
        best = torch.topk(merged_scores, k=beams)[1]
        new_sequences = torch.take_along_dim(torch.cat((sequences, candidates), dim=1), best.unsqueeze(-1), dim=1)
        new_scores = torch.take_along_dim(merged_scores, best, dim=1)
        new_finished = torch.take_along_dim(torch.cat((finished, just_finished), dim=1), best, dim=1)
        new_lengths = torch.take_along_dim(torch.cat((lengths, (cur_len + 1).expand(rows, keep)), dim=1), best, dim=1)
        new_len = cur_len + 1
        # Can a running beam still beat the worst finished one? (transformers' heuristic)
        if early == "never" and penalty > 0.0:
            hypothetical = (max_len - 1).float()
        else:
            hypothetical = (new_len - 1).float()
        best_running = new_running_scores[:, :1] / (hypothetical**penalty)
        worst_finished = torch.where(new_finished, new_scores.min(dim=1, keepdim=True)[0], torch.full_like(new_scores, _NEG))
        new_improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        open_beams = ~(new_finished | padded.unsqueeze(1)).all() if early is True else torch.ones((), dtype=torch.bool, device=device)
        can_continue = ~(hits | padded.unsqueeze(1)).all()
        done = ~(new_improvable.any() & open_beams & can_continue)
        running = _keep(stopped, running, new_running)
        running_scores = _keep(stopped, running_scores, new_running_scores)
        sequences = _keep(stopped, sequences, new_sequences)
        scores = _keep(stopped, scores, new_scores)
        finished = _keep(stopped, finished, new_finished)
        lengths = _keep(stopped, lengths, new_lengths)
        improvable = _keep(stopped, improvable, new_improvable)
        cur_len = _keep(stopped, cur_len, new_len)
        state["stopped"] = stopped | done
    # transformers returns the best hypothesis of each row and trims to the longest one (>= the start token).
    return sequences[:, 0], lengths[:, 0]
