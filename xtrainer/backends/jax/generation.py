"""Generation on the JAX backend: what `JaxBackend.generate(state, batch, gen_kwargs)` runs.

Two model kinds are supported:

* Flax NNX reference models (`xtrainer.models.T5ForConditionalGeneration`,
  `xtrainer.models.LlamaForCausalLM`, or any NNX module following the encode/decode or
  causal-LM protocol of `xtrainer.models.generation`): greedy or beam search runs as one jitted
  program on the current (sharded) parameters of the train state, built from the adapter's
  eval-mode graph. It is compiled once per (batch shape, generation settings) and reused for every
  later batch of that shape; the result is trimmed to the longest row with one host read.
* torch modules trained through torchax: the current weights are handed back to the torch module
  (as `finalize` does; skipped while the parameters have not changed since the last call, so an
  evaluation copies them once) and transformers' own `module.generate` runs in torch on the host
  batch. The result comes back as a JAX int array.

Linen and functional models raise NotImplementedError naming what is supported.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax.numpy as jnp
import numpy as np

from ...models.generation import compiled_search, is_encoder_decoder, resolve_settings

# Batch columns that are prompts/encoder inputs; labels and decoder inputs are what is predicted.
_PROMPT_KEYS = ("input_ids", "attention_mask")

SUPPORTED = ("Flax NNX encoder-decoder models with encode/decode (xtrainer.models.T5ForConditionalGeneration), "
             "NNX causal LMs taking position_ids (xtrainer.models.LlamaForCausalLM), "
             "and torch modules with a transformers `generate` method (through torchax)")


def _is_causal_lm(model: Any) -> bool:
    try:
        params = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return False
    return "position_ids" in params and "input_ids" in params


def generate_batch(backend: Any, state: Any, batch: Any, gen_kwargs: dict | None) -> Any:
    """Generated ids (B * num_return_sequences, L) for one eval micro-batch, as HF's generate returns them.

    Args:
        backend: a prepared JaxBackend.
        state: the train state (None before training: the prepared parameters are used).
        batch: what `backend.shard_batch` returned (device arrays + the host batch).
        gen_kwargs: HF-style generation settings (see `xtrainer.models.generation.resolve_settings`).
    """
    adapter = backend.adapter
    params, extra = (state["params"], state["extra"]) if state is not None else (backend.params, backend.extra)
    if "input_ids" not in batch.arrays:
        raise ValueError(f"generation needs an `input_ids` column; the batch has {sorted(batch.arrays)}")
    if adapter.kind == "nnx":
        model = adapter.model
        if not (is_encoder_decoder(model) or _is_causal_lm(model)):
            raise NotImplementedError(
                f"generate() does not know how to decode {type(model).__name__}; supported: {SUPPORTED}")
        input_ids = batch.arrays["input_ids"]
        settings = resolve_settings(model, input_ids.shape[1], gen_kwargs)
        tokens, used = compiled_search(adapter.graphdefs[False], (params, extra), input_ids,
                                       batch.arrays.get("attention_mask"), settings)
        return tokens[:, : int(used)]
    if adapter.kind == "torchax":
        return _torch_generate(backend, adapter, params, extra, batch.host, gen_kwargs)
    raise NotImplementedError(
        f"generate() is not available for {adapter.kind} models on the JAX backend; supported: {SUPPORTED}")


def _torch_generate(backend, adapter, params, extra, host_batch, gen_kwargs):
    import torch

    module = adapter.module
    if not callable(getattr(module, "generate", None)):
        raise NotImplementedError(f"{type(module).__name__} has no `generate` method; supported: {SUPPORTED}")
    # Copy weights back only when they changed: during one evaluation the params object is the same.
    if getattr(backend, "_generate_synced_params", None) is not params:
        adapter.write_back(params, extra)
        backend._generate_synced_params = params
    inputs = {k: torch.from_numpy(np.asarray(host_batch[k])) for k in _PROMPT_KEYS if k in host_batch}
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module.generate(**inputs, **dict(gen_kwargs or {}))
    finally:
        module.train(was_training)
    sequences = out.sequences if hasattr(out, "sequences") else out
    return jnp.asarray(sequences.cpu().numpy())
