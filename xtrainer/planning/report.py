"""The plan of one train step on one TPU preset: what it holds, what it computes, how it is sharded.

`PlanReport` is plain data: `to_dict()` is what `plan.json` holds, `format_table()` what
`xtrainer plan` prints.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 1024**3


@dataclass
class TensorPlan:
    """One parameter or optimizer-state array as the step holds it."""

    path: str
    kind: str  # "param" or "optimizer"
    shape: tuple[int, ...]
    dtype: str
    spec: str  # the PartitionSpec, or "replicated"
    bytes_per_device: int
    flagged: bool = False  # fully replicated and larger than the report's threshold


@dataclass
class PlanReport:
    preset: str
    topology: str
    devices: int
    hosts: int
    mesh: dict[str, int]
    route: str  # which backend a pod run of this model takes, and why
    model: str
    parameters: int
    per_device_batch: int
    gradient_accumulation_steps: int
    sequence_length: int
    tokens_per_step: int  # all devices, one optimizer step
    hbm_bytes: int  # per device, from the preset
    memory: dict[str, int]  # StepMemory.as_dict(), per device
    fits: bool
    param_bytes_per_device: int
    optimizer_bytes_per_device: int
    flops_per_device: float  # from the compiled HLO, loop bodies x trip counts
    xla_cost_flops_per_device: float | None  # XLA's cost_analysis (loop bodies once), for comparison
    model_flops_per_device: float  # 6·N·tokens + attention, no rematerialisation
    model_flops_formula: str
    hbm_traffic_bytes: float
    collectives: dict[str, dict[str, float]]
    roofline: dict[str, Any] | None
    chip_sources: dict[str, str]
    tensors: list[TensorPlan] = field(default_factory=list)
    replicated_threshold_bytes: int = 1 << 20
    compile_seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.flagged]

    @property
    def recompute_flops_per_device(self) -> float:
        """FLOPs beyond the model's (rematerialisation, mostly), per device."""
        return max(0.0, self.flops_per_device - self.model_flops_per_device)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["flagged_replicated"] = [t.path for t in self.flagged]
        out["recompute_flops_per_device"] = self.recompute_flops_per_device
        return out

    def write_json(self, path: str) -> str:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as handle:
            json.dump(self.to_dict(), handle, indent=2, default=str)
        return path

    def format_table(self, max_tensors: int = 12) -> str:
        """A readable report (per device unless said otherwise)."""
        m = self.memory
        gib = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
        lines = [
            f"Plan: {self.model} on {self.preset} ({self.topology}: {self.devices} devices, {self.hosts} hosts), "
            f"mesh {self.mesh}",
            f"Route: {self.route}",
            f"Batch: {self.per_device_batch} per device x {self.gradient_accumulation_steps} accumulation, "
            f"sequence {self.sequence_length}: {self.tokens_per_step:,} tokens per step; "
            f"{self.parameters / 1e9:.3f}B parameters",
            "",
            "Memory per device                       ",
            f"  arguments (state + batch)   {gib(m['arguments'])}   params {gib(self.param_bytes_per_device).strip()}, "
            f"optimizer {gib(self.optimizer_bytes_per_device).strip()}",
            f"  outputs (not aliased)       {gib(m['outputs'] - m['aliased'])}",
            f"  temporaries                 {gib(m['temporaries'])}",
            f"  generated code              {gib(m['generated_code'])}",
            f"  total                       {gib(m['total'])}   of {gib(self.hbm_bytes).strip()} HBM "
            f"({100 * m['total'] / max(self.hbm_bytes, 1):.1f}%): {'FITS' if self.fits else 'DOES NOT FIT'}",
            "",
            "FLOPs per device per step",
            f"  compiled step (HLO, loops x trip counts) {self.flops_per_device:.4e}",
            f"  model: {self.model_flops_formula:<33}{self.model_flops_per_device:.4e}  "
            f"(compiled/model = {self.flops_per_device / max(self.model_flops_per_device, 1):.3f})",
            f"  recomputation and other non-model FLOPs  {self.recompute_flops_per_device:.4e}",
        ]
        if self.xla_cost_flops_per_device is not None:
            lines.append(f"  XLA cost_analysis (loop bodies once)     {self.xla_cost_flops_per_device:.4e}")
        lines += ["", "Collectives per device per step (from the compiled HLO)"]
        if not self.collectives:
            lines.append("  none")
        for kind, entry in sorted(self.collectives.items()):
            lines.append(f"  {kind:<19} {int(entry['count']):6d} ops  {entry['bytes'] / GIB:9.3f} GiB of data  "
                         f"{entry['ring_bytes'] / GIB:9.3f} GiB sent")
        if self.roofline:
            r = self.roofline
            lines += [
                "",
                "Roofline estimate (chip figures and their sources: tpu_configs/<preset>.yaml, `chip:`)",
                f"  compute {r['compute_s'] * 1e3:9.2f} ms   HBM {r['hbm_s'] * 1e3:9.2f} ms   "
                f"ICI {r['ici_s'] * 1e3:9.2f} ms   -> step {r['step_s'] * 1e3:.2f} ms ({r['bound']}-bound; "
                f"{r['no_overlap_s'] * 1e3:.2f} ms if collectives do not overlap)",
                f"  MFU at that step time {100 * r['mfu']:.1f}%   {r['tokens_per_s_per_device']:,.0f} tokens/s/device",
            ]
        lines += ["", f"Shardings (largest first; * = fully replicated and over "
                      f"{self.replicated_threshold_bytes / 2**20:.0f} MiB)"]
        for t in sorted(self.tensors, key=lambda t: -t.bytes_per_device)[:max_tensors]:
            mark = "*" if t.flagged else " "
            lines.append(f" {mark} {t.kind:<9} {t.path:<52} {str(list(t.shape)):<18} {t.dtype:<8} "
                         f"{t.spec:<22} {t.bytes_per_device / 2**20:10.2f} MiB")
        if len(self.tensors) > max_tensors:
            lines.append(f"   ... {len(self.tensors) - max_tensors} more in plan.json")
        if self.flagged:
            lines.append(f"  {len(self.flagged)} replicated array(s) over the threshold: "
                         + ", ".join(t.path for t in self.flagged[:6]))
        lines += ["", f"Compiled for {self.topology} in {self.compile_seconds:.1f} s."]
        lines += [f"Note: {note}" for note in self.notes]
        if self.files:
            lines.append("Files: " + ", ".join(f"{k} {v}" for k, v in self.files.items()))
        return "\n".join(lines)
