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

    Lifecycle: `prepare` once per Trainer (it receives the user's hooks, xtrainer/hooks.py, and refuses
    overrides it cannot honour); per `train()`: `wrap_for_training`, then the Trainer's (overridable)
    create_optimizer / create_scheduler call `create_optimizer` / `create_scheduler` here, then
    `init_state`; then `shard_window` + `train_step` in the hot loop; `save`/`restore` at checkpoints;
    `export_model` through the Trainer's `_save`; `finalize` hands the trained weights back to the
    user's model object.

    User hooks: the Trainer's default `compute_loss`, `training_step`, `prediction_step`,
    `_prepare_inputs` and `autocast_smart_context_manager` delegate to the methods of the same role
    here; the backend calls back through `hooks` (never the Trainer itself), so an override runs where
    transformers runs it.
    """

    name: str
    #: data-parallel processes the host pipeline splits batches over, and this one's index
    num_processes: int
    process_index: int
    #: devices along the batch-sharding axes on this process (multiplies the per-device batch)
    local_batch_devices: int
    #: True when one state file holds the weights with the optimizer state (JAX): a checkpoint has no
    #: separate model files and `restore` brings the weights back; False: the Trainer's `_save` and
    #: `_load_from_checkpoint` write and read the model files, `save`/`restore` the rest.
    weights_restored_with_state: bool
    #: whether every checkpoint also gets the model files (transformers' layout) through the Trainer's `_save`
    model_files_in_checkpoints: bool

    def prepare(self, model: Any, args: Any, *, hooks: Any) -> Any:
        """Places the model on devices; returns the model object the Trainer exposes as `trainer.model`.

        Raises hooks.UnsupportedHookError for an override this backend cannot honour."""

    def model_input_names(self) -> list[str] | None:
        """Argument names the model's forward accepts (for remove_unused_columns), or None if unknown."""

    def default_label_names(self) -> list[str]:
        """Label argument names of the model (HF's find_labels)."""

    def counts_label_items(self) -> tuple[bool, bool]:
        """(whether the loss is normalised by num_items_in_batch, whether it shifts labels)."""

    # ------------------------------------------------------------------ optimizer, schedule, state

    def wrap_for_training(self) -> Any:
        """The model that runs forward in training (`trainer.model_wrapped`: DDP/FSDP/compiled or the model)."""

    def optimizer_target(self) -> Any:
        """The model whose parameters the default optimizer updates."""

    def decay_parameter_names(self, model: Any) -> list[str]:
        """The default get_decay_parameter_names: parameters weight decay applies to."""

    def create_optimizer(self, model: Any) -> Any:
        """The default optimizer for args.optim (torch: torch.optim.Optimizer; jax: optax transformation)."""

    def create_scheduler(self, num_training_steps: int, optimizer: Any) -> Any:
        """The default lr schedule (torch: LRScheduler; jax: callable step -> learning rate)."""

    def init_state(self, num_training_steps: int, optimizer: Any, scheduler: Any) -> Any:
        """Builds the run's state around the optimizer and schedule the Trainer settled on."""

    def learning_rates(self, optimizer: Any) -> list[float]:
        """The current learning rate of each parameter group (Trainer.get_learning_rates)."""

    def optimizer_group(self, optimizer: Any, param: Any = None) -> Any:
        """Trainer.get_optimizer_group: the group holding `param`, or every group's parameters."""

    # ------------------------------------------------------------------ the Trainer's default hooks

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        """Default compute_loss: the model's loss, compute_loss_func, or label smoothing."""

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        """Default training_step: forward (through hooks.compute_loss) and backward of one micro-batch."""

    def prediction_step(self, model: Any, inputs: Any, prediction_loss_only: bool, ignore_keys: list[str] | None = None) -> EvalOutput:
        """Default prediction_step: (loss, logits, labels) of one eval batch, each possibly None."""

    def prepare_inputs(self, inputs: Any) -> Any:
        """Default _prepare_input: the inputs where the model runs."""

    def autocast_context(self, cache_enabled: bool | None = True) -> Any:
        """Default autocast_smart_context_manager: the mixed-precision context of the loss (or a null one)."""

    # ------------------------------------------------------------------ data and steps

    def shard_batch(self, batch: HostBatch) -> Any:
        """Moves one host eval batch to the device(s)."""

    def shard_window(self, window: Sequence[HostBatch]) -> Any:
        """Moves one accumulation window of host micro-batches to the device(s), in whatever layout
        train_step wants (a list of batches, or arrays stacked on a leading accumulation axis)."""

    def train_step(self, state: Any, window: Any, num_items_in_batch: int | None, events: StepEvents) -> tuple[Any, StepMetrics]:
        """One optimizer step over an accumulation window made by shard_window, firing `events`."""

    def eval_model(self, state: Any) -> Any:
        """The model prediction_step receives (the training wrapper, a device copy, or a bound JAX model)."""

    def eval_inputs(self, batch: Any) -> Any:
        """A batch made by shard_batch as the dict of tensors prediction_step receives."""

    def trim_padding(self, output: EvalOutput, batch: Any) -> EvalOutput:
        """prediction_step's output without the rows/positions the backend padded onto `batch`."""

    def generate(self, model: Any, inputs: Any, gen_kwargs: dict) -> Any:
        """Generates token ids for one eval batch (Seq2SeqTrainer, predict_with_generate).

        `model` and `inputs` are what eval_model / eval_inputs made. `gen_kwargs` are HF-style generate
        arguments (max_length, max_new_tokens, num_beams, ...), already stripped of None values; a key the
        backend cannot honour raises a ValueError naming it. Returns a backend-native int array
        [batch, length] exactly as HF `model.generate` returns it (encoder-decoder: starting with the
        decoder start token; decoder-only: the prompt followed by the new tokens), with only the batch's
        real rows.
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

    # ------------------------------------------------------------------ state I/O

    def save(self, state: Any, directory: str, *, save_only_model: bool = False) -> None:
        """Writes the training state into an (unpublished) checkpoint directory: optimizer, schedule and
        RNG state, and, when weights_restored_with_state, the weights too."""

    def restore(self, state: Any, directory: str, *, include_model: bool = True) -> Any:
        """Reads what `save` wrote (or what transformers' Trainer wrote) and returns the state; with
        include_model=False the weights were loaded already (the Trainer's _load_from_checkpoint)."""

    def adopt_model_weights(self, state: Any) -> Any:
        """The state with the weights the user's model object holds now (after a user's _load_from_checkpoint)."""

    def load_model_weights(self, state: Any, directory: str) -> None:
        """Loads only the model weights of a checkpoint (default _load_from_checkpoint, load_best_model_at_end)."""

    def model_state_for_save(self, state: Any) -> Any:
        """Full weights gathered for writing, on every process (collective where weights are sharded), or None."""

    def export_model(self, state: Any, directory: str, state_dict: Any = None) -> None:
        """Writes the model in its own library's format (e.g. save_pretrained) for use elsewhere (main process)."""

    def finalize(self, state: Any) -> Any:
        """Makes the user's model object hold the trained weights; returns it."""

    def barrier(self) -> None:
        """Waits for every process (no-op on one process)."""

    def preemption_requested(self, step: int, local_flag: bool, *, final: bool = False) -> bool:
        """Whether to save `step` and stop for a preemption (SIGTERM); called after every optimizer step,
        and once more with final=True after the last one.

        Host-only (no device sync). `local_flag` is whether this process got SIGTERM. One process
        returns it; several must return the same answer at the same step on every process (torch:
        an all-reduce of the flags, read one step late; multi-host JAX: JAX's preemption sync point).
        A backend whose processes agree through a runtime service has a true `native_preemption_notice`
        attribute and an `announce_preemption()` that the SIGTERM handler calls to tell the service.
        """


class CheckpointCoordination(Protocol):
    """Optional Backend methods that checkpoint_writer.py uses when a backend has them: asynchronous
    saves, and the agreement of several processes on a save's outcome. Without them a backend's
    `save` runs in the step loop and several processes only meet at `barrier`."""

    def save_async(self, state: Any, directory: str, *, save_only_model: bool = False,
                   outcome_tag: str | None = None, background: bool = True) -> Any:
        """Optional. Starts `save`; returns a function that finishes it (blocks until the files are written).

        Everything that reads device state happens before it returns (the device-to-host copy), so
        the next step may change the state while the function runs in a background thread
        (background=True; with False it runs right away). `outcome_tag` is the `exchange` tag under
        which each process's outcome of this save will be posted.
        """

    def exchange(self, tag: str, value: Any) -> list:
        """Optional. Every process's small host `value` (JSON-able), in process order.

        Collective over processes, never over devices, and safe from a background thread; `tag` names
        the exchange (the same on every process). One process: [value].
        """

    def forget(self, tag: str) -> None:
        """Optional. Drops what the exchanges under `tag` left behind, once every process has read it."""
