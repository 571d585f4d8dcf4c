"""A step-time estimate from a roofline: compute, HBM traffic and ICI traffic per device.

Each resource alone bounds the step from below: FLOPs / peak FLOP/s, HBM bytes / HBM bandwidth,
collective bytes / ICI bandwidth. With XLA overlapping collectives with compute, the step takes
about the largest of the three; with no overlap, more. The estimate is the largest (the usual
roofline) and the no-overlap time (the larger of compute and HBM, plus the collectives) is reported beside it. Real steps reach 50-70% of the compute bound on large
models (MaxText's published MFUs); the estimate is a floor, not a prediction of MFU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ChipFigures:
    """Per-chip peak figures of a TPU generation (from the preset files, each with its source)."""

    peak_flops: float  # bf16 FLOP/s
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # bidirectional, all links of the chip
    sources: dict[str, str]

    @classmethod
    def from_preset(cls, preset) -> ChipFigures | None:
        chip = getattr(preset, "chip", None) or {}
        if not all(k in chip for k in ("peak_bf16_tflops", "hbm_gbytes_per_s", "ici_gbytes_per_s")):
            return None
        return cls(chip["peak_bf16_tflops"][0] * 1e12, chip["hbm_gbytes_per_s"][0] * 1e9,
                   chip["ici_gbytes_per_s"][0] * 1e9, {k: v[1] for k, v in chip.items()})


@dataclass(frozen=True)
class Roofline:
    compute_s: float
    hbm_s: float
    ici_s: float
    step_s: float  # max of the three: collectives and memory traffic overlapped with compute
    no_overlap_s: float  # compute (or HBM, if larger) plus collectives: no overlap with communication
    bound: str  # "compute", "hbm" or "ici"
    mfu: float  # model FLOPs (no rematerialisation) / (step_s x peak)
    tokens_per_s_per_device: float

    def as_dict(self) -> dict:
        return asdict(self)


def estimate(chip: ChipFigures, *, flops: float, model_flops: float, hbm_bytes: float, ici_bytes: float,
             tokens: float) -> Roofline:
    """Roofline of one device's step.

    Args:
        flops: FLOPs the device executes (rematerialisation included).
        model_flops: the device's share of the model's FLOPs (6·N·tokens + attention, no remat): MFU counts these.
        hbm_bytes: bytes the device moves between HBM and its cores.
        ici_bytes: bytes the device sends over ICI (ring algorithms); one direction of the chip's links.
        tokens: tokens the device processes per step.
    """
    compute = flops / chip.peak_flops
    hbm = hbm_bytes / chip.hbm_bytes_per_s
    ici = ici_bytes / (chip.ici_bytes_per_s / 2)  # sending uses one direction of each link
    times = {"compute": compute, "hbm": hbm, "ici": ici}
    bound = max(times, key=times.get)
    step = times[bound]
    return Roofline(compute_s=compute, hbm_s=hbm, ici_s=ici, step_s=step, no_overlap_s=max(compute, hbm) + ici,
                    bound=bound, mfu=model_flops / (step * chip.peak_flops) if step > 0 else 0.0,
                    tokens_per_s_per_device=tokens / step if step > 0 else 0.0)
