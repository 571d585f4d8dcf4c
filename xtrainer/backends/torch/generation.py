"""Generation on the torch backend: transformers' own `model.generate`, called as Seq2SeqTrainer calls it.

The Seq2SeqTrainer front hands over one eval micro-batch already on the device and HF-style
generate kwargs; here the inputs are prepared the way transformers' `Seq2SeqTrainer.prediction_step`
prepares them (decoder inputs that were built from the labels are dropped, so the model decodes
freely instead of continuing the teacher-forced prefix), and `generate` runs in eval mode without
gradients, under the same autocast as evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

#: Decoder inputs that a collator derives from the labels (DataCollatorForSeq2Seq and friends).
DECODER_INPUT_KEYS = ("decoder_input_ids", "decoder_attention_mask")


def generation_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The model inputs generate() receives for one batch.

    `decoder_input_ids` shaped like `labels` were built from them (shift right) and would make the
    model continue the reference; they are dropped together with their attention mask, as
    transformers does. Everything else (labels included) is passed on unchanged.
    """
    inputs = dict(batch)
    labels, decoder_ids = inputs.get("labels"), inputs.get("decoder_input_ids")
    if labels is not None and decoder_ids is not None and tuple(labels.shape) == tuple(decoder_ids.shape):
        inputs = {k: v for k, v in inputs.items() if k not in DECODER_INPUT_KEYS}
    return inputs


def hf_generate(model: nn.Module, batch: Mapping[str, Any], gen_kwargs: dict, *, autocast=None, synced_gpus: bool = False):
    """Runs `model.generate` on one batch; returns the generated ids tensor [batch, length].

    Args:
        model: a transformers model with `generate` (the unwrapped module, not a DDP/compile wrapper).
        batch: device tensors of one eval micro-batch.
        gen_kwargs: HF generate kwargs (max_length, num_beams, ...), None values already removed.
        autocast: the evaluation autocast context (None: full precision).
        synced_gpus: keep all processes stepping together (FSDP-sharded weights need every rank).
    """
    if not callable(getattr(model, "generate", None)):
        raise ValueError(
            f"predict_with_generate=True needs a model with a `generate` method; {type(model).__name__} has none "
            "(use a transformers generation model, e.g. T5ForConditionalGeneration)."
        )
    if gen_kwargs.get("do_sample"):
        raise ValueError("do_sample=True is not supported in evaluation: predictions must be reproducible.")
    kwargs = dict(gen_kwargs)
    kwargs.setdefault("synced_gpus", synced_gpus)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast if autocast is not None else contextlib.nullcontext():
            tokens = model.generate(**generation_inputs(batch), **kwargs)
    finally:
        model.train(was_training)
    config = getattr(model, "generation_config", None)
    # As transformers' Seq2SeqTrainer: a config derived from the model config is initialised once, not on
    # every batch (later calls then see the same settings as HF's do).
    if config is not None and getattr(config, "_from_model_config", False):
        config._from_model_config = False
    if not isinstance(tokens, torch.Tensor):  # return_dict_in_generate=True in the model's generation config
        tokens = tokens.sequences
    return tokens
