"""total_flos, as transformers counts it: 6 x tokens x non-embedding parameters per micro-batch, for models
that can count their parameters (`num_parameters(exclude_embeddings=True)`, transformers' PreTrainedModel);
0 for others, unless a subclass overrides Trainer.floating_point_ops."""

from __future__ import annotations

from typing import Any

import numpy as np


def floating_point_ops(model: Any, inputs: dict) -> int:
    """Forward + backward FLOPs of one micro-batch (host arrays or tensors)."""
    main_input = getattr(model, "main_input_name", "input_ids")
    counter = getattr(model, "num_parameters", None)
    if main_input not in inputs or not callable(counter):
        return 0
    tokens = int(np.prod(np.shape(inputs[main_input])))
    return 6 * tokens * int(counter(exclude_embeddings=True))


def store_flos(trainer) -> None:
    """Moves the FLOPs counted since the last call into state.total_flos (summed over processes)."""
    current = float(getattr(trainer, "current_flos", 0) or 0)
    if trainer.backend.num_processes > 1:
        current = float(trainer.backend.all_sum(int(current)))
    trainer.state.total_flos += current
    trainer.current_flos = 0.0
