"""`xtrainer plot`: the loss, learning-rate and evaluation curves of a run, as one PNG.

The curves come from the run's log history, found in this order:
1. `OUTPUT_DIR/trainer_state.json` (written by `trainer.save_state()` at the end of a run);
2. for a run still in progress, whichever of the newest `checkpoint-N/trainer_state.json` and
   `OUTPUT_DIR/log_history.jsonl` (`report_to="jsonl"`, written at every log) reaches the later step.

Drawn with matplotlib's Agg canvas directly (no pyplot), so it needs no display and leaves the
caller's matplotlib state alone.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

from .checkpoint import TRAINER_STATE_NAME
from .extras import require
from .trainer_utils import sorted_checkpoints

DEFAULT_PLOT_NAME = "training_curves.png"
JSONL_NAME = "log_history.jsonl"
_MAX_EVAL_PANELS = 6
# Eval keys that are timings or bookkeeping, not curves worth a panel.
_SKIP_SUFFIXES = ("_runtime", "_per_second", "_model_preparation_time")


def _last_step(history: Sequence[dict]) -> int:
    return max((int(h.get("step", 0)) for h in history), default=-1)


def _read_state_history(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return list(json.load(f).get("log_history", []))


def _read_jsonl(path: str) -> list[dict]:
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a run killed mid-write
                continue
    return entries


def load_log_history(output_dir: str) -> tuple[list[dict], str]:
    """The run's log history and the file it came from (see the module docstring for the order).

    Raises:
        FileNotFoundError: naming the directory, when it holds none of those files.
    """
    final = os.path.join(output_dir, TRAINER_STATE_NAME)
    if os.path.isfile(final):
        return _read_state_history(final), final
    candidates: list[tuple[list[dict], str]] = []
    checkpoints = sorted_checkpoints(output_dir) if os.path.isdir(output_dir) else []
    for checkpoint in reversed(checkpoints):  # newest first; a half-written one has no state yet
        state_path = os.path.join(checkpoint, TRAINER_STATE_NAME)
        if os.path.isfile(state_path):
            candidates.append((_read_state_history(state_path), state_path))
            break
    jsonl = os.path.join(output_dir, JSONL_NAME)
    if os.path.isfile(jsonl):
        candidates.append((_read_jsonl(jsonl), jsonl))
    if not candidates:
        raise FileNotFoundError(
            f"No training logs in {output_dir!r}: expected {TRAINER_STATE_NAME}, a checkpoint-N/{TRAINER_STATE_NAME} "
            f"or {JSONL_NAME} (report_to='jsonl') there."
        )
    return max(candidates, key=lambda c: _last_step(c[0]))


def _series(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for entry in history:
        value = entry.get(key)
        if isinstance(value, str):  # NaN/inf as written by the jsonl callback
            try:
                value = float(value)
            except ValueError:
                continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(int(entry.get("step", 0)))
            values.append(float(value))
    return steps, values


def _eval_metric_keys(history: Sequence[dict]) -> list[str]:
    keys: list[str] = []
    for entry in history:
        for key in entry:
            if key.startswith("eval_") and key != "eval_loss" and not key.endswith(_SKIP_SUFFIXES) and key not in keys:
                keys.append(key)
    return keys[:_MAX_EVAL_PANELS]


def plot_training_curves(output_dir: str, output_path: str | None = None, dpi: int = 110) -> str:
    """Writes a PNG of the run's curves against the global step; returns its path.

    Panels: training loss with eval_loss, the learning rate, tokens per second (when logged), then
    one per other eval_* metric.

    Args:
        output_dir: the run's output_dir.
        output_path: where to write the PNG; default OUTPUT_DIR/training_curves.png.

    Raises:
        FileNotFoundError: when output_dir holds no log history.
        ValueError: when the history holds no curve to draw.
    """
    require("matplotlib", "plot", "xtrainer plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    history, source = load_log_history(output_dir)
    panels: list[tuple[str, list[tuple[str, tuple[list[int], list[float]]]]]] = []
    loss_lines = [(label, _series(history, key)) for label, key in (("train loss", "loss"), ("eval loss", "eval_loss"))]
    loss_lines = [line for line in loss_lines if line[1][0]]
    if loss_lines:
        panels.append(("loss", loss_lines))
    lr = _series(history, "learning_rate")
    if lr[0]:
        panels.append(("learning rate", [("learning_rate", lr)]))
    throughput = _series(history, "tokens_per_second")
    if throughput[0]:
        panels.append(("tokens per second", [("tokens_per_second", throughput)]))
    for key in _eval_metric_keys(history):
        series = _series(history, key)
        if series[0]:
            panels.append((key, [(key, series)]))
    if not panels:
        raise ValueError(f"{source} holds no loss, learning_rate or eval_* values to plot yet.")

    columns = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(6.0 * columns, 3.6 * rows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    last = _last_step(history)
    figure.suptitle(f"{os.path.basename(os.path.normpath(output_dir))}: step {last} ({os.path.basename(source)})")
    for index, (title, lines) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        for label, (steps, values) in lines:
            marker = "o" if len(steps) <= 30 else None  # sparse curves (evals) read better with markers
            axes.plot(steps, values, label=label, marker=marker, markersize=3, linewidth=1.4)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        axes.grid(True, alpha=0.3)
        if title == "learning rate":
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(lines) > 1:
            axes.legend()
    output_path = output_path or os.path.join(output_dir, DEFAULT_PLOT_NAME)
    parent = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(parent, exist_ok=True)
    figure.savefig(output_path, format="png")
    return output_path
