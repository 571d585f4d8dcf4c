"""NEFTune (TrainingArguments.neftune_noise_alpha) for torch modules: noisy input embeddings in training.

NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning") adds uniform
noise in [-m, m] with m = alpha / sqrt(seq_len * hidden) to the input embeddings of every training
forward pass, and none in evaluation. As in transformers, a forward hook on the model's input
embedding adds it while the module is in training mode; the trainer attaches the hook for a
train() run and removes it afterwards.

One difference from transformers 5.x: its hook sits on `get_input_embeddings()` only, and models
whose encoder and decoder embed through their own modules tied to that weight (T5: `shared` vs
`encoder.embed_tokens` / `decoder.embed_tokens`) never call it, so the noise is silently absent.
Here every embedding module tied to the input-embedding weight gets the hook, which is what
transformers 4.x did through its single shared module.

Used by the torch and torch_xla backends and, under torchax, by the JAX backend: `uniform_` then
draws from the step's PRNG key (torchax_bridge sets it per call), so the noise is deterministic per seed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def neftune_forward_hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """Adds NEFTune noise of scale `module.neftune_noise_alpha` / sqrt(seq_len * hidden) in training mode."""
    if not module.training:
        return output
    # The bound in float32 arithmetic, as transformers computes it (so the same generator gives
    # bitwise-equal noise), on the host: under torchax a tensor op here would be traced.
    bound = float(np.float32(module.neftune_noise_alpha) / np.sqrt(np.float32(output.size(1) * output.size(2))))
    return output + torch.zeros_like(output).uniform_(-bound, bound)


def input_embedding_modules(model: nn.Module) -> list[nn.Module]:
    """The model's input embedding and every module tied to its weight (each embeds inputs somewhere).

    Raises:
        ValueError: the model has no `get_input_embeddings()` returning a module.
    """
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    if not isinstance(embeddings, nn.Module):
        raise ValueError(
            f"neftune_noise_alpha adds noise to the input embeddings, but {type(model).__name__} has no "
            "`get_input_embeddings()` returning its embedding module (transformers models have it): add that "
            "method, or unset neftune_noise_alpha."
        )
    weight = getattr(embeddings, "weight", None)
    found = [embeddings]
    if weight is not None:
        for module in model.modules():
            if module is not embeddings and getattr(module, "weight", None) is weight and isinstance(module, nn.Embedding):
                found.append(module)
    return found


class Neftune:
    """The hooks of one train() run: `attach` at its start, `detach` at its end (idempotent)."""

    def __init__(self, alpha: float | None, model: nn.Module | None = None):
        """`model`, when given, is checked now (at Trainer construction) for an input embedding."""
        self.alpha = alpha
        self._handles: list = []
        self._modules: list[nn.Module] = []
        if alpha is not None and model is not None:
            input_embedding_modules(model)

    def attach(self, model: nn.Module) -> None:
        self.detach()
        if self.alpha is None:
            return
        for module in input_embedding_modules(model):
            module.neftune_noise_alpha = float(self.alpha)
            self._handles.append(module.register_forward_hook(neftune_forward_hook))
            self._modules.append(module)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._modules:
            if hasattr(module, "neftune_noise_alpha"):
                del module.neftune_noise_alpha
        self._handles, self._modules = [], []
