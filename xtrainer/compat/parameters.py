"""Parameter counts of the models every backend trains (torch modules, Flax NNX, linen, functional).

They feed `get_num_trainable_parameters`, the training banner and `floating_point_ops`. Only shapes
are read, so counting a model whose arrays live on accelerators never copies or waits on them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..model_wrappers import FunctionalModel, LinenModel

#: The name Flax gives an embedding table (nnx.Embed, linen.Embed, xtrainer.models' Embed).
_FLAX_EMBEDDING_NAME = "embedding"


def _is_torch_module(model: Any) -> bool:
    return any(k.__name__ == "Module" and k.__module__.startswith("torch.nn") for k in type(model).__mro__)


def _torch_count(model, trainable_only: bool, exclude_embeddings: bool) -> int:
    skipped: set[str] = set()
    if exclude_embeddings:
        import torch

        skipped = {f"{name}.weight" if name else "weight" for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Embedding)}
    total = 0
    for name, param in model.named_parameters():  # a tied weight is listed (and counted) once
        if name in skipped or (trainable_only and not param.requires_grad):
            continue
        total += param.numel()
    return total


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def _tree_count(tree: Any, exclude_embeddings: bool) -> int:
    import jax

    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if exclude_embeddings and _FLAX_EMBEDDING_NAME in (_key_name(k) for k in path):
            continue
        total += int(np.prod(np.shape(leaf), dtype=np.int64))
    return total


def count_parameters(model: Any, trainable_only: bool = False, exclude_embeddings: bool = False) -> int:
    """Number of parameters of `model` (transformers' `num_parameters` rules).

    Args:
        model: a torch.nn.Module, a flax.nnx.Module, a LinenModel or a FunctionalModel.
        trainable_only: torch modules: only parameters with requires_grad (JAX models train every
            parameter: nnx.Param variables, linen's "params" collection, a FunctionalModel's params).
        exclude_embeddings: leave out embedding tables (torch.nn.Embedding weights; Flax parameters
            named "embedding").

    Raises:
        TypeError: for a model of another kind.
    """
    if _is_torch_module(model):
        return _torch_count(model, trainable_only, exclude_embeddings)
    if isinstance(model, LinenModel):
        return _tree_count(model.variables.get("params", {}), exclude_embeddings)
    if isinstance(model, FunctionalModel):
        return _tree_count(model.params, exclude_embeddings) if model.params is not None else 0
    try:
        from flax import nnx
    except ImportError:
        nnx = None
    if nnx is not None and isinstance(model, nnx.Module):
        return _tree_count(nnx.state(model, nnx.Param), exclude_embeddings)
    raise TypeError(f"Cannot count the parameters of a {type(model).__name__}.")


__all__ = ["count_parameters"]
