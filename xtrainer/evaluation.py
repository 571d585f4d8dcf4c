"""The evaluation/prediction loop behind Trainer.evaluate() and Trainer.predict().

Batches run through the backend's eval_step; `preprocess_logits_for_metrics` sees backend-native
arrays (torch tensors on the torch backend, as HF scripts expect); everything is then moved to the
host (every `eval_accumulation_steps` batches, or at the end) and concatenated with -100 padding
where sequence lengths differ.
"""

from __future__ import annotations

import numpy as np

from . import data
from .backends.base import EvalOutput
from .compat.banner import log_evaluation_banner
from .user_loaders import as_loader
from .trainer_utils import EvalLoopOutput, EvalPrediction, denumpify_detensorize


class _HostAccumulator:
    """Collects per-batch results on device and moves them to the host in chunks."""

    def __init__(self, to_host):
        self.to_host = to_host
        self.device_chunks: list = []
        self.host_chunks: list = []

    def add(self, value) -> None:
        if value is not None:
            self.device_chunks.append(value)

    def flush(self) -> None:
        if self.device_chunks:
            self.host_chunks.extend(self.to_host(self.device_chunks))
            self.device_chunks = []

    def result(self, concat: bool):
        self.flush()
        if not self.host_chunks:
            return None
        return data.nested_concat(self.host_chunks, padding_index=-100) if concat else self.host_chunks


def _mark_last(batches):
    """Yields (batch, is_last), looking one batch ahead (so streams know their last batch too)."""
    iterator = iter(batches)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for upcoming in iterator:
        yield current, False
        current = upcoming
    yield current, True


def run_evaluation(trainer, loader, description, prediction_loss_only, ignore_keys, metric_key_prefix) -> EvalLoopOutput:
    """Evaluates `loader` with the trainer's model; returns predictions, labels, metrics and sample count."""
    args, backend = trainer.args, trainer.backend
    loss_only = prediction_loss_only if prediction_loss_only is not None else args.prediction_loss_only
    state = trainer._backend_state  # None before train(): the backend evaluates the model as it is
    batch_size = args.per_device_eval_batch_size * backend.local_batch_devices
    log_evaluation_banner(trainer, loader, description, batch_size)
    include = set(args.include_for_metrics or [])
    keep_batches = not args.batch_eval_metrics or description == "Prediction"
    losses, preds, labels, inputs = (_HostAccumulator(backend.to_host) for _ in range(4))
    handler = trainer.callback_handler
    handler.eval_dataloader = loader
    loader = as_loader(loader, "eval" if description == "Evaluation" else "test")  # an override's own loader too
    metrics = None
    observed = 0
    main_input = getattr(trainer.model, "main_input_name", "input_ids")
    model = backend.eval_model(state)
    for step, (host_batch, is_last) in enumerate(_mark_last(loader.epoch(0))):
        rows = data.batch_size_of(host_batch) or batch_size
        observed += rows
        batch = backend.shard_batch(host_batch)
        # The (overridable) prediction_step sees what transformers' sees: the model and a dict of its tensors.
        step_out = trainer.prediction_step(model, backend.eval_inputs(batch), loss_only, ignore_keys=ignore_keys)
        out = backend.trim_padding(EvalOutput(*step_out), batch)
        logits, batch_labels = out.logits, out.labels
        batch_losses = None
        if out.loss is not None:
            # Each example weighs its batch's mean loss (HF's repeat + gather_for_metrics truncation);
            # a trainer may weigh every batch as a full one instead (HF's Seq2SeqTrainer: plain gather).
            weight_rows = batch_size if trainer.eval_loss_full_batch_weight else rows
            batch_losses = backend.repeat_scalar(out.loss, weight_rows)
            losses.add(batch_losses)
        if trainer.preprocess_logits_for_metrics is not None or args.batch_eval_metrics:
            # User code sees the model's own tensor type (torch tensors for a torch model trained through torchax).
            logits, batch_labels = backend.metrics_view(logits), backend.metrics_view(batch_labels)
        if logits is not None and trainer.preprocess_logits_for_metrics is not None:
            logits = trainer.preprocess_logits_for_metrics(logits, batch_labels)
        if keep_batches:
            preds.add(logits)
            labels.add(batch_labels)
            if "inputs" in include:
                inputs.add(host_batch.get(main_input))
        trainer.control = handler.on_prediction_step(args, trainer.state, trainer.control)
        if args.batch_eval_metrics:
            if trainer.compute_metrics is not None and logits is not None and batch_labels is not None:
                # As in HF: per-example losses and the whole (device) input batch.
                extra = {
                    "losses": batch_losses if "loss" in include else None,
                    "inputs": batch if "inputs" in include else None,
                }
                metrics = trainer.compute_metrics(
                    EvalPrediction(predictions=logits, label_ids=batch_labels, **extra), compute_result=is_last
                )
        elif args.eval_accumulation_steps is not None and (step + 1) % args.eval_accumulation_steps == 0:
            for acc in (losses, preds, labels):
                acc.flush()
    if observed == 0 and loader.has_length():
        raise ValueError("The evaluation dataset produced no batch.")
    concat = args.eval_do_concat_batches
    all_losses = losses.result(concat=True)
    all_preds, all_labels = preds.result(concat), labels.result(concat)
    all_inputs = inputs.result(concat)
    num_samples = loader.num_examples if loader.has_length() else None
    if num_samples is None:  # a stream, or a user's loader that knows no dataset: the examples it gave
        num_samples = observed
    if trainer.compute_metrics is not None and all_preds is not None and all_labels is not None and not args.batch_eval_metrics:
        extra = {
            "losses": all_losses if "loss" in include else None,
            "inputs": all_inputs if "inputs" in include else None,
        }
        metrics = trainer.compute_metrics(EvalPrediction(predictions=all_preds, label_ids=all_labels, **extra))
    metrics = denumpify_detensorize(dict(metrics or {}))
    if isinstance(all_losses, np.ndarray):
        finite = np.isfinite(all_losses)
        kept = all_losses[finite] if args.logging_nan_inf_filter and finite.any() else all_losses
        metrics[f"{metric_key_prefix}_loss"] = float(kept.mean())
    for key in list(metrics):
        if not key.startswith(f"{metric_key_prefix}_"):
            metrics[f"{metric_key_prefix}_{key}"] = metrics.pop(key)
    return EvalLoopOutput(predictions=all_preds, label_ids=all_labels, metrics=metrics, num_samples=num_samples)
