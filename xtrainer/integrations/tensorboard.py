"""`report_to="tensorboard"`: scalars of every log written as TensorBoard event files.

Written with TensorBoard's own event-file writer (no torch, no tensorflow, no tensorboardX), so it
works the same in every lane and with every backend. The layout follows transformers: the logs of
`output_dir/runs/<Mon DD_HH-MM-SS>_<host>/` (or `logging_dir`, or `$TENSORBOARD_LOGGING_DIR`),
keys renamed `train/loss`, `eval/loss`, `test/...`, the training arguments as a text summary.
"""

from __future__ import annotations

import logging
import numbers
import os
import socket
import time
from datetime import datetime

from ..callbacks import TrainerCallback

logger = logging.getLogger(__name__)


def default_logdir() -> str:
    """`runs/<Mon DD_HH-MM-SS>_<hostname>`, the directory name torch's SummaryWriter (and HF) pick."""
    return os.path.join("runs", datetime.now().strftime("%b%d_%H-%M-%S") + "_" + socket.gethostname())


def rewrite_logs(logs: dict) -> dict:
    """`eval_x` -> `eval/x`, `test_x` -> `test/x`, anything else -> `train/x` (TensorBoard groups by prefix)."""
    out = {}
    for key, value in logs.items():
        if key.startswith("eval_"):
            out["eval/" + key[len("eval_"):]] = value
        elif key.startswith("test_"):
            out["test/" + key[len("test_"):]] = value
        else:
            out["train/" + key] = value
    return out


class EventWriter:
    """A minimal scalar/text summary writer on top of tensorboard's EventFileWriter."""

    def __init__(self, log_dir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self._writer = EventFileWriter(log_dir)

    def _write(self, summary, step: int) -> None:
        from tensorboard.compat.proto import event_pb2

        self._writer.add_event(event_pb2.Event(summary=summary, wall_time=time.time(), step=int(step)))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Writes one scalar point (shown in TensorBoard's Scalars tab)."""
        from tensorboard.compat.proto import summary_pb2

        self._write(summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))]), step)

    def add_text(self, tag: str, text: str, step: int = 0) -> None:
        """Writes one text summary (shown in TensorBoard's Text tab)."""
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._write(text_pb(tag, text), step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class TensorBoardCallback(TrainerCallback):
    """Writes every log's numeric values as TensorBoard scalars at the log's global step.

    Args:
        tb_writer: an object with add_scalar/add_text/flush/close to write through instead (e.g. a
            torch SummaryWriter); by default an `EventWriter` is created at train begin.
    """

    def __init__(self, tb_writer=None):
        self.tb_writer = tb_writer
        self.logging_dir: str | None = None

    def _resolve_dir(self, args, state) -> str:
        if state.is_hyper_param_search and state.trial_name is not None:
            # One sub-directory per trial, so TensorBoard shows the trials as separate runs.
            return os.path.join(args.output_dir, default_logdir(), state.trial_name)
        configured = getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
        if configured:
            return os.path.expanduser(configured)
        return os.path.join(args.output_dir, default_logdir())

    def _ensure_writer(self, args, state) -> None:
        if self.tb_writer is None:
            # Kept after train end, so a later evaluate() writes into the same run directory.
            self.logging_dir = self.logging_dir or self._resolve_dir(args, state)
            self.tb_writer = EventWriter(self.logging_dir)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if state.is_hyper_param_search:  # a new trial: a new run directory
            if self.tb_writer is not None:
                self.tb_writer.close()
            self.tb_writer, self.logging_dir = None, None
        self._ensure_writer(args, state)
        self.tb_writer.add_text("args", args.to_json_string())
        config = getattr(kwargs.get("model"), "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            self.tb_writer.add_text("model_config", config.to_json_string())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self._ensure_writer(args, state)
        for key, value in rewrite_logs(logs).items():
            if isinstance(value, bool):
                value = int(value)
            if isinstance(value, numbers.Real) or (hasattr(value, "item") and getattr(value, "size", 1) == 1):
                self.tb_writer.add_scalar(key, float(value), state.global_step)
            elif isinstance(value, str):
                self.tb_writer.add_text(key, value, state.global_step)
            else:
                logger.warning("TensorBoardCallback drops %r: a %s is not a scalar.", key, type(value).__name__)
        self.tb_writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.tb_writer is not None:
            self.tb_writer.close()
            self.tb_writer = None
