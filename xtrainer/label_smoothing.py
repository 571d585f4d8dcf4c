"""transformers' `Trainer.label_smoother` attribute: the label-smoothed loss as a callable.

The backends compute the smoothed loss themselves (torch: backends/torch/backend.py's
`label_smoothed_loss`); this object exists for scripts and subclasses that call
`trainer.label_smoother(outputs, labels)` as they would in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LabelSmoother:
    """Cross entropy with label smoothing over model outputs (a dict with `logits`, or a tuple whose first
    element is the logits); positions labelled `ignore_index` do not count.

    Args:
        epsilon: the label smoothing factor.
        ignore_index: the label value that marks positions without a target.
    """

    epsilon: float = 0.1
    ignore_index: int = -100

    def __call__(self, model_output, labels, shift_labels: bool = False, num_items_in_batch=None):
        if self.ignore_index != -100:
            raise ValueError("LabelSmoother supports ignore_index=-100 only (transformers' label padding value).")
        from .backends.torch.backend import label_smoothed_loss

        logits = model_output["logits"] if isinstance(model_output, dict) else model_output[0]
        return label_smoothed_loss(logits, labels, self.epsilon, num_items_in_batch, shift=shift_labels)
