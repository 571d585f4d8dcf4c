"""`report_to="jsonl"`: every log as one JSON line in `output_dir/log_history.jsonl`.

Each line is the log's values plus `step` (the same dict that goes into `state.log_history`),
written and flushed as soon as it is logged, so `tail -f` and `xtrainer plot` see a run in
progress. On resume the lines of steps after the resumed checkpoint (logged by the interrupted
run, and about to be logged again) are dropped first, so the file never holds a step twice.
"""

from __future__ import annotations

import json
import math
import os

from ..callbacks import TrainerCallback

LOG_FILE_NAME = "log_history.jsonl"


def _plain(value):
    """numpy/jax/torch scalars -> Python numbers; NaN/inf -> strings JSON can carry."""
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:
        value = value.item()
    elif hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": strict JSON has no literal for them
    return value


def read_jsonl(path: str) -> list[dict]:
    """The log entries of a log_history.jsonl file; a torn last line (a run killed mid-write) is skipped."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return entries


class JsonlCallback(TrainerCallback):
    """Appends `{**logs, "step": global_step}` to `output_dir/log_history.jsonl` at every log."""

    def __init__(self, file_name: str = LOG_FILE_NAME):
        self.file_name = file_name

    def _path(self, args) -> str:
        return os.path.join(args.output_dir, self.file_name)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        path = self._path(args)
        if not os.path.exists(path):
            return
        # Keep what this run's history already holds (steps up to the resumed step); drop the rest.
        kept = [e for e in read_jsonl(path) if isinstance(e.get("step"), int) and e["step"] <= state.global_step]
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for entry in kept:
                f.write(json.dumps(entry) + "\n")
        os.replace(tmp, path)  # atomic: a crash here leaves the old file or the new, never half of one

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or logs is None:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        entry = {key: _plain(value) for key, value in {**logs, "step": state.global_step}.items()}
        with open(self._path(args), "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
