"""The callbacks that ship with the Trainer besides the flow control: progress bars, printing, early stopping.

They are re-exported by `xtrainer.callbacks`, where transformers users look for them.
"""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

from .callbacks import ExportableState, TrainerCallback, _has_length, _strategy

logger = logging.getLogger("xtrainer.callbacks")


def _format_logs(logs: dict, max_str_len: int | None = None) -> dict:
    out = {}
    for key, value in logs.items():
        if key == "total_flos":
            continue
        if max_str_len is not None and isinstance(value, str) and len(value) > max_str_len:
            value = (
                f"[String too long to display, length: {len(value)} > {max_str_len}. "
                "Consider increasing `max_str_len` if needed.]"
            )
        elif isinstance(value, float):
            value = f"{value:.4g}"
        out[key] = value
    return out


class ProgressCallback(TrainerCallback):
    """Shows tqdm bars for training and prediction on the main process and writes logs under the bar.

    Log strings longer than `max_str_len` are replaced by a short notice.
    """

    def __init__(self, max_str_len: int = 100):
        self.training_bar = None
        self.prediction_bar = None
        self.max_str_len = max_str_len
        self.current_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True)
        self.current_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.update(state.global_step - self.current_step)
            self.current_step = state.global_step

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and _has_length(eval_dataloader):
            if self.prediction_bar is None:
                self.prediction_bar = tqdm(
                    total=len(eval_dataloader), leave=self.training_bar is None, dynamic_ncols=True
                )
            self.prediction_bar.update(1)

    def _close_prediction_bar(self, state):
        if state.is_world_process_zero and self.prediction_bar is not None:
            self.prediction_bar.close()
            self.prediction_bar = None

    def on_evaluate(self, args, state, control, **kwargs):
        self._close_prediction_bar(state)

    def on_predict(self, args, state, control, **kwargs):
        self._close_prediction_bar(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs is not None:
            self.training_bar.write(str(_format_logs(logs, self.max_str_len)))

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


class PrinterCallback(TrainerCallback):
    """Prints the logs (without `total_flos`) on the local main process."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs is not None:
            print(_format_logs(logs))


class EarlyStoppingCallback(TrainerCallback, ExportableState):
    """Stops training once `metric_for_best_model` has not improved for `early_stopping_patience` evaluations.

    An evaluation improves when its metric is better than `state.best_metric` (per `greater_is_better`) by more
    than `early_stopping_threshold`. `state.best_metric` is maintained by the trainer after each evaluation, so
    this needs `metric_for_best_model` and an evaluation strategy other than "no"; without
    `load_best_model_at_end` it only warns (the best model is then not reloaded at the end).
    """

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float | None = 0.0):
        self.early_stopping_patience = early_stopping_patience
        self.early_stopping_threshold = early_stopping_threshold
        # Number of consecutive evaluations without improvement.
        self.early_stopping_patience_counter = 0

    def check_metric_value(self, args, state, control, metric_value) -> None:
        best = state.best_metric
        threshold = self.early_stopping_threshold or 0.0
        if best is None:
            improved = True
        else:
            better = metric_value > best if getattr(args, "greater_is_better", False) else metric_value < best
            improved = bool(better) and abs(metric_value - best) > threshold
        if improved:
            self.early_stopping_patience_counter = 0
        else:
            self.early_stopping_patience_counter += 1

    def on_train_begin(self, args, state, control, **kwargs):
        if getattr(args, "metric_for_best_model", None) is None:
            raise ValueError(
                "EarlyStoppingCallback requires `metric_for_best_model` to be set in the training arguments"
            )
        if _strategy(getattr(args, "eval_strategy", None)) == "no":
            raise ValueError(
                "EarlyStoppingCallback requires an evaluation strategy of 'steps' or 'epoch' (eval_strategy is 'no')"
            )
        if not getattr(args, "load_best_model_at_end", False):
            logger.warning(
                "Using EarlyStoppingCallback without load_best_model_at_end=True. "
                "Once training is finished, the best model will not be loaded automatically."
            )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        key = args.metric_for_best_model
        if not key.startswith("eval_"):
            key = f"eval_{key}"
        value = (metrics or {}).get(key)
        if value is None:
            logger.warning(
                f"Early stopping requires metric_for_best_model, but {key} was not found: early stopping is disabled"
            )
            return
        self.check_metric_value(args, state, control, value)
        if self.early_stopping_patience_counter >= self.early_stopping_patience:
            control.should_training_stop = True

    def state(self) -> dict:
        return {
            "args": {
                "early_stopping_patience": self.early_stopping_patience,
                "early_stopping_threshold": self.early_stopping_threshold,
            },
            "attributes": {"early_stopping_patience_counter": self.early_stopping_patience_counter},
        }
