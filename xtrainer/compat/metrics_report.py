"""Trainer.log_metrics / save_metrics / metrics_format: the end-of-run metric reports transformers' example
scripts print and save (train_results.json, eval_results.json, all_results.json)."""

from __future__ import annotations

import datetime
import json
import os


def _seconds_as_clock(seconds: float) -> str:
    """12.34 -> "0:00:12.34" (hours:minutes:seconds.hundredths)."""
    hundredths = int(abs(seconds - int(seconds)) * 100)
    return f"{datetime.timedelta(seconds=int(seconds))}.{hundredths:02d}"


def metrics_format(metrics: dict) -> dict:
    """Metrics made readable: memory in MB, runtimes as clock time, total_flos in GF, floats to 4 places."""
    out = dict(metrics)
    for key, value in metrics.items():
        if "_mem_" in key:
            out[key] = f"{int(value) >> 20}MB"
        elif "_runtime" in key:
            out[key] = _seconds_as_clock(value)
        elif key == "total_flos":
            out[key] = f"{int(value) >> 30}GF"
        elif isinstance(value, float):
            out[key] = round(value, 4)
    return out


def log_metrics(trainer, split: str, metrics: dict) -> None:
    """Prints `***** {split} metrics *****` and one aligned line per metric (main process only)."""
    if not trainer.is_world_process_zero():
        return
    print(f"***** {split} metrics *****")
    formatted = metrics_format(metrics)
    if not formatted:
        return
    key_width = max(len(str(k)) for k in formatted)
    value_width = max(len(str(v)) for v in formatted.values())
    for key in sorted(formatted):
        print(f"  {key: <{key_width}} = {formatted[key]:>{value_width}}")


def save_metrics(trainer, split: str, metrics: dict, combined: bool = True) -> None:
    """Writes `{split}_results.json` into output_dir, and with `combined` merges it into all_results.json."""
    if not trainer.is_world_process_zero():
        return
    output_dir = trainer.args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{split}_results.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=4, sort_keys=True)
    if combined:
        path = os.path.join(output_dir, "all_results.json")
        merged = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                merged = json.load(f)
        merged.update(metrics)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(merged, f, indent=4, sort_keys=True)
