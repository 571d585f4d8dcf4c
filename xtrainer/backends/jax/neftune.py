"""NEFTune (TrainingArguments.neftune_noise_alpha) on the JAX backend.

Two kinds of models carry the noise:

- Flax models whose `get_input_embeddings()` returns an embedding with a `neftune_noise_alpha`
  attribute (xtrainer.models' Llama, BERT and T5): the alpha is set on that module while the
  adapter captures the model's graph definitions, so the compiled steps carry it as a constant
  while the user's model object is left as it was. The model draws the noise from the key the
  step hands it (the step's RNG folded per micro-batch), in training only.
- torch modules through torchax: the torch backend's forward hook (backends/torch/neftune.py),
  attached for each train() run; torchax makes its `uniform_` draw from the step's key.

Any other model is refused when the Trainer is built: the noise cannot be added from outside a
compiled Flax model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def _is_torch_module(model: Any) -> bool:
    return any(k.__module__.startswith("torch.nn") and k.__name__ == "Module" for k in type(model).__mro__)


def _flax_input_embeddings(model: Any, alpha: float):
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    if embeddings is None or not hasattr(embeddings, "neftune_noise_alpha"):
        raise ValueError(
            f"neftune_noise_alpha={alpha} adds noise to the input embeddings, which backend='jax' can do for "
            "xtrainer.models' Llama, BERT and T5 and for torch modules (through torchax); "
            f"{type(model).__name__} has no `get_input_embeddings()` returning an embedding with a "
            "`neftune_noise_alpha` attribute. Give your model one that adds the noise in training (see "
            "xtrainer.models._nn.Embed), or unset neftune_noise_alpha."
        )
    return embeddings


@contextlib.contextmanager
def flax_noise_while_capturing(model: Any, alpha: float | None) -> Iterator[None]:
    """Sets `alpha` on a Flax model's input embedding for the duration of the block (the adapter's
    graph capture), then puts the previous value back.

    A no-op without alpha and for torch modules (see `TorchaxNeftune`).

    Raises:
        ValueError: a Flax model whose input embedding cannot add NEFTune noise.
    """
    if alpha is None or _is_torch_module(model):
        yield
        return
    embeddings = _flax_input_embeddings(model, alpha)
    previous = embeddings.neftune_noise_alpha
    embeddings.neftune_noise_alpha = float(alpha)
    try:
        yield
    finally:
        embeddings.neftune_noise_alpha = previous


class TorchaxNeftune:
    """The torch forward hooks for a torch module trained through torchax (none for Flax models)."""

    def __init__(self, model: Any, alpha: float | None):
        self.model = model
        self.hooks = None
        if alpha is not None and _is_torch_module(model):
            from ..torch.neftune import Neftune

            self.hooks = Neftune(alpha, model)

    def attach(self) -> None:
        """Before the train step is traced (init_state)."""
        if self.hooks is not None:
            self.hooks.attach(self.model)

    def detach(self) -> None:
        """After the run (finalize): later traces (evaluation, generation) see the plain embedding."""
        if self.hooks is not None:
            self.hooks.detach()
