"""`report_to="wandb"`: logs sent to a Weights & Biases run.

Configured through wandb's own environment variables, as with transformers: `WANDB_PROJECT`
(default "huggingface"), `WANDB_MODE=offline` (write the run under `WANDB_DIR` without a
network, sync later with `wandb sync`), `WANDB_DISABLED=true` (skip). The run is named
`args.run_name`; during a hyperparameter search each trial is its own run, named after the trial
and grouped under run_name. Keys are renamed like TensorBoard's (`train/loss`, `eval/loss`) and
plotted against `train/global_step`; the end-of-training totals (train_runtime, train_loss, ...)
go to the run summary instead of the charts.
"""

from __future__ import annotations

import logging
import os

from ..callbacks import TrainerCallback
from .tensorboard import rewrite_logs

logger = logging.getLogger(__name__)

# Logged once at the end of training: they belong in the summary, not in a one-point chart.
SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos")


def _disabled() -> bool:
    return os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes", "on")


class WandbCallback(TrainerCallback):
    """Starts a wandb run at train begin (or at the first log) and logs every log to it."""

    def __init__(self):
        import wandb  # fail at Trainer construction, not mid-training, when wandb is missing

        self._wandb = wandb
        self._initialized = False

    def setup(self, args, state, model=None) -> None:
        """Starts the run (unless one is already active) and records the arguments as its config."""
        self._initialized = True
        if _disabled() or not state.is_world_process_zero:
            return
        config = dict(args.to_dict())
        model_config = getattr(model, "config", None)
        if model_config is not None and hasattr(model_config, "to_dict"):
            config = {**model_config.to_dict(), **config}
        init_args = {}
        if state.trial_name is not None:
            init_args = {"name": state.trial_name, "group": args.run_name}
        elif args.run_name is not None:
            init_args = {"name": args.run_name}
        if self._wandb.run is None:
            self._wandb.init(project=os.environ.get("WANDB_PROJECT", "huggingface"), **init_args)
        self._wandb.config.update(config, allow_val_change=True)
        self._wandb.define_metric("train/global_step")
        self._wandb.define_metric("*", step_metric="train/global_step", step_sync=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_hyper_param_search and self._initialized:  # each trial is its own run
            if self._wandb.run is not None:
                self._wandb.finish()
            self._initialized = False
        if not self._initialized:
            self.setup(args, state, model)

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, model)
        if _disabled() or not state.is_world_process_zero or not logs or self._wandb.run is None:
            return
        summary = {k: v for k, v in logs.items() if k in SUMMARY_KEYS}
        for key, value in summary.items():
            self._wandb.run.summary[key] = value
        charts = {k: v for k, v in logs.items() if k not in SUMMARY_KEYS}
        if charts:
            self._wandb.log({**rewrite_logs(charts), "train/global_step": state.global_step})

    def on_train_end(self, args, state, control, **kwargs):
        # The run stays open (as in transformers) so evaluate() after train() logs into it; wandb
        # finishes it at exit, or call wandb.finish().
        return
