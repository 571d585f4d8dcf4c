"""`total_flos`, counted as transformers counts it.

transformers adds `floating_point_ops(inputs)` of every micro-batch to a per-process counter
(`current_flos`) and moves it into `state.total_flos` (summed over processes) whenever it logs, saves
a checkpoint or finishes training (`store_flos`). The default estimate is transformers': a forward
and backward pass costs 6 FLOPs per non-embedding parameter per token of the main input,
`6 * inputs[main_input_name].numel() * num_parameters(exclude_embeddings=True)`.

Here the micro-batches are the host pipeline's numpy batches, so the count needs no device work.
A torch model gets a count when it has transformers' `num_parameters` (as in transformers; others
count 0 unless `floating_point_ops` is overridden); JAX models (Flax NNX, linen, functional) are
always counted, from their parameter shapes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .parameters import _is_torch_module, count_parameters

#: all_sum adds int64s: counting in MFLOPs keeps one log interval of a large run (above 9.2e18 FLOPs) in range.
_SUM_UNIT = 1e6


def _numel(value: Any) -> int:
    numel = getattr(value, "numel", None)  # torch tensors (a subclass may hand them in)
    return int(numel()) if callable(numel) else int(np.size(value))


class FlopsEstimator:
    """transformers' default `floating_point_ops`, with the model's parameter count computed once."""

    def __init__(self):
        self._counted: tuple[int, int] | None = None  # (id of the model, non-embedding parameters)

    def _non_embedding_parameters(self, model: Any) -> int | None:
        if _is_torch_module(model):
            if not hasattr(model, "num_parameters"):  # not a transformers model: 0, as in transformers
                return None
            count = lambda: int(model.num_parameters(exclude_embeddings=True))  # noqa: E731
        else:
            count = lambda: count_parameters(model, exclude_embeddings=True)  # noqa: E731
        if self._counted is None or self._counted[0] != id(model):
            self._counted = (id(model), count())
        return self._counted[1]

    def __call__(self, model: Any, inputs: dict) -> int:
        """FLOPs of one forward and backward pass of `model` on `inputs` (0 when it cannot tell)."""
        main_input = getattr(model, "main_input_name", "input_ids")
        if not isinstance(inputs, dict) or main_input not in inputs:
            return 0
        try:
            params = self._non_embedding_parameters(model)
        except TypeError:  # a model kind whose parameters cannot be counted
            return 0
        if params is None:
            return 0
        return 6 * _numel(inputs[main_input]) * params


def sum_over_processes(flos: float, backend: Any) -> float:
    """This process's FLOPs since the last store, summed over the data-parallel processes (a collective
    when there are several: every process calls it at the same log / save, as transformers does)."""
    if backend.num_processes <= 1:
        return flos
    return backend.all_sum(int(round(flos / _SUM_UNIT))) * _SUM_UNIT


__all__ = ["FlopsEstimator", "sum_over_processes"]
