"""The metrics report of transformers' Trainer: `metrics_format`, `log_metrics`, `save_metrics`.

Scripts in transformers' style end with

    metrics = trainer.train().metrics
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)

which prints an aligned table (`***** train metrics *****`) and writes `train_results.json` plus the
merged `all_results.json` into output_dir. The formatting rules are transformers': memory metrics in
MB, runtimes as h:mm:ss.cc, `total_flos` in GF, other floats rounded to 4 digits.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

ALL_RESULTS_NAME = "all_results.json"


def _duration(seconds: float) -> str:
    """h:mm:ss.cc (hundredths truncated), the format transformers prints runtimes in."""
    hundredths = int(abs(seconds - int(seconds)) * 100)
    return f"{datetime.timedelta(seconds=int(seconds))}.{hundredths:02d}"


def metrics_format(metrics: dict[str, float]) -> dict[str, Any]:
    """A copy of `metrics` with human-readable values (the original is not changed).

    - `*_mem_*` values (bytes) become "NMB";
    - `*_runtime*` values (seconds) become "h:mm:ss.cc";
    - `total_flos` becomes "NGF" (2**30 FLOPs);
    - other floats are rounded to 4 decimals.

    Example:
        >>> metrics_format({"train_runtime": 3725.5, "total_flos": 3 * 2**30, "loss": 0.123456})
        {'train_runtime': '1:02:05.50', 'total_flos': '3GF', 'loss': 0.1235}
    """
    formatted = dict(metrics)
    for key, value in formatted.items():
        if "_mem_" in key and isinstance(value, (int, float)):
            formatted[key] = f"{int(value) >> 20}MB"
        elif "_runtime" in key and isinstance(value, (int, float)):
            formatted[key] = _duration(value)
        elif key == "total_flos" and isinstance(value, (int, float)):
            formatted[key] = f"{int(value) >> 30}GF"
        elif isinstance(value, float):
            formatted[key] = round(value, 4)
    return formatted


class unbound:
    """A function kept on a class without binding, whatever it is called on (like staticmethod), while the
    class attribute still looks like the plain function it wraps. transformers' Trainer.metrics_format is a
    plain function in the class body; this keeps its signature and makes `trainer.metrics_format(m)` work."""

    def __init__(self, function):
        self.__func__ = function
        self.__doc__ = function.__doc__

    def __get__(self, instance, owner=None):
        return self.__func__


def format_metrics_table(split: str, metrics: dict[str, float]) -> str:
    """The block `log_metrics` prints: a header, then `key = value` lines sorted by key, aligned."""
    formatted = metrics_format(metrics)
    lines = [f"***** {split} metrics *****"]
    if formatted:
        key_width = max(len(str(k)) for k in formatted)
        value_width = max(len(str(v)) for v in formatted.values())
        for key in sorted(formatted):
            lines.append(f"  {key: <{key_width}} = {str(formatted[key]):>{value_width}}")
    return "\n".join(lines)


def save_metrics_files(output_dir: str, split: str, metrics: dict[str, float], combined: bool = True) -> list[str]:
    """Writes `{split}_results.json` and, with `combined`, merges the metrics into `all_results.json`.

    Both files are indented and key-sorted JSON, as transformers writes them; a key already in
    all_results.json is overwritten by the newer value. Returns the paths written.
    """
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, f"{split}_results.json")]
    _write_json(paths[0], metrics)
    if combined:
        combined_path = os.path.join(output_dir, ALL_RESULTS_NAME)
        merged: dict[str, Any] = {}
        if os.path.exists(combined_path):
            with open(combined_path, encoding="utf-8") as f:
                merged = json.load(f)
        merged.update(metrics)
        _write_json(combined_path, merged)
        paths.append(combined_path)
    return paths


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=4, sort_keys=True)
    os.replace(tmp, path)  # a reader never sees half a file (all_results.json is rewritten in place)


__all__ = ["ALL_RESULTS_NAME", "format_metrics_table", "metrics_format", "save_metrics_files"]
