"""The Backend protocol: the only surface between the Trainer front and a device stack.

The front owns the one training loop (epochs, accumulation windows, strategies, callbacks,
checkpoint layout and rotation). A backend owns device placement, the compiled steps and state I/O.
Nothing here imports torch or jax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

HostBatch = dict[str, np.ndarray]


class StepMetrics(NamedTuple):
    """What one optimizer step reports. Device values stay on device until the front logs.

    Attributes:
        loss: device scalar, the window's loss as HF reports it (sum of the per-micro-batch losses
            used for backward).
        grad_norm: device scalar (pre-clipping global norm), or None.
        learning_rate: the learning rate this step used (a host float: it comes from the schedule,
            not from the device).
        nonfinite: under nan_policy "skip"/"raise", the run's device counters
            {"skipped", "first_bad", "metric"} after this step (see xtrainer/nan_policy.py), else None.
    """

    loss: Any
    grad_norm: Any
    learning_rate: float
    nonfinite: Any = None


class StepEvents(Protocol):
    """Callback points inside one optimizer step, fired by the backend where they really happen.

    A backend that runs the whole step as one compiled program (JAX) fires them, in order, after
    dispatching it; the torch backend fires them between backward passes and around the update, so
    `on_pre_optimizer_step` sees the gradients, as in transformers.
    """

    def substep_end(self) -> None: ...
    def pre_optimizer_step(self) -> None: ...
    def optimizer_step(self) -> None: ...


class EvalOutput(NamedTuple):
    """One evaluation batch: backend-native arrays (the front calls preprocess_logits_for_metrics on them)."""

    loss: Any
    logits: Any
    labels: Any


@runtime_checkable
class Backend(Protocol):
    """What the Trainer front needs from a device stack.

    Lifecycle: `prepare` once per Trainer; `init_state` once per `train()`; then `shard_batch` +
    `train_step` in the hot loop; `save`/`restore` at checkpoints; `export_model` for save_model;
    `finalize` hands the trained weights back to the user's model object.
    """

    name: str
    #: data-parallel processes the host pipeline splits batches over, and this one's index
    num_processes: int
    process_index: int
    #: devices along the batch-sharding axes on this process (multiplies the per-device batch)
    local_batch_devices: int

    def prepare(self, model: Any, args: Any, *, compute_loss_func: Any = None) -> Any:
        """Places the model on devices; returns the model object the Trainer exposes as `trainer.model`."""

    def model_input_names(self) -> list[str] | None:
        """Argument names the model's forward accepts (for remove_unused_columns), or None if unknown."""

    def default_label_names(self) -> list[str]:
        """Label argument names of the model (HF's find_labels)."""

    def counts_label_items(self) -> tuple[bool, bool]:
        """(whether the loss is normalised by num_items_in_batch, whether it shifts labels)."""

    def init_state(self, num_training_steps: int, optimizers: tuple = (None, None),
                   optimizer_cls_and_kwargs: tuple | None = None) -> Any:
        """Builds optimizer and lr schedule state for a training run of num_training_steps.

        `optimizers` is the Trainer's (optimizer, scheduler) pair (None: built from the arguments);
        `optimizer_cls_and_kwargs` its (class or factory, kwargs) that replaces the `optim` choice.
        """

    def shard_batch(self, batch: HostBatch) -> Any:
        """Moves one host micro-batch to the device(s); may run ahead of use."""

    def shard_window(self, window: Sequence[HostBatch]) -> Any:
        """Moves one accumulation window of host micro-batches to the device(s), in whatever layout
        train_step wants (a list of batches, or arrays stacked on a leading accumulation axis)."""

    def train_step(self, state: Any, window: Any, num_items_in_batch: int | None, events: StepEvents) -> tuple[Any, StepMetrics]:
        """One optimizer step over an accumulation window made by shard_window, firing `events`."""

    def eval_step(self, state: Any, batch: Any, prediction_loss_only: bool, ignore_keys: list[str] | None, label_names: list[str]) -> EvalOutput:
        """Forward pass without gradients; returns loss (or None), logits (or None), labels (or None)."""

    def generate(self, state: Any, batch: Any, gen_kwargs: dict) -> Any:
        """Generates token ids for one eval micro-batch made by `shard_batch` (Seq2SeqTrainer, predict_with_generate).

        `gen_kwargs` are HF-style generate arguments (max_length, max_new_tokens, num_beams, ...), already
        stripped of None values; a key the backend cannot honour raises a ValueError naming it. Returns a
        backend-native int array [batch, length] exactly as HF `model.generate` returns it (encoder-decoder:
        starting with the decoder start token; decoder-only: the prompt followed by the new tokens), with
        only the batch's real rows.
        """

    def step_flops(self) -> float | None:
        """FLOPs of the last optimizer step on all devices together (for the `mfu` log), or None if unknown.

        Read on the host at log time only; it must not synchronise with the device.
        """

    def peak_flops(self) -> float | None:
        """Peak FLOP/s of all the devices the steps run on together (for the `mfu` log), or None if unknown."""

    def to_host(self, tree: Any) -> Any:
        """Device arrays (nested) -> numpy, with one synchronisation for the whole tree."""

    def repeat_scalar(self, value: Any, times: int) -> Any:
        """A device scalar repeated `times` times (eval losses are weighted per example, as in HF)."""

    def all_sum(self, value: int) -> int:
        """Sums a host integer over all data-parallel processes."""

    def on_eval_metric(self, state: Any, value: float) -> None:
        """Feeds an evaluation metric to metric-driven schedules (reduce_lr_on_plateau)."""

    def save(self, state: Any, directory: str, *, save_only_model: bool = False) -> None:
        """Writes model, optimizer, schedule and RNG state into an (unpublished) checkpoint directory."""

    def restore(self, state: Any, directory: str) -> Any:
        """Reads what `save` wrote (or what transformers' Trainer wrote) and returns the state."""

    def load_model_weights(self, state: Any, directory: str) -> None:
        """Loads only the model weights of a checkpoint (load_best_model_at_end)."""

    def export_model(self, state: Any, directory: str) -> None:
        """Writes the model in its own library's format (e.g. save_pretrained) for use elsewhere."""

    def finalize(self, state: Any) -> Any:
        """Makes the user's model object hold the trained weights; returns it."""

    def barrier(self) -> None:
        """Waits for every process (no-op on one process)."""

    def preemption_requested(self, step: int, local_flag: bool) -> bool:
        """Whether to save `step` and stop for a preemption (SIGTERM); called after every optimizer step.

        Host-only (no device sync). `local_flag` is whether this process got SIGTERM. Single-process
        and torch backends return it; multi-host JAX returns JAX's preemption sync point, so every
        host stops at the same step. A backend whose runtime catches SIGTERM itself (so the front
        must not install a Python handler) has a true `native_preemption_notice` attribute.
        """
