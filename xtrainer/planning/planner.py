"""Plan a TPU run without the TPU: compile the real train step for a preset's topology and report on it.

`plan(model, args, tpu_config)` builds the JAX backend's own train step (`JaxBackend.jit_train_step`,
the function `Trainer.train()` compiles) over the devices of the preset's topology, with the model's
parameters, optimizer state and batch as abstract arrays, and compiles it with the TPU compiler
(libtpu) on this machine. The compiled program gives the memory per device, the FLOPs, the
collectives and the shardings; the preset's chip figures turn them into a step-time estimate.
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from ..tpu_presets import TpuPreset, load_preset
from . import hlo_stats
from .abstract import DefaultHookOwner, PlanningBackend, bytes_per_device, default_hooks, replicated_spec, spec_text
from .memory import GIB, StepDoesNotFit, StepMemory, compiler_allocations, fit_knobs, is_resource_exhausted
from .report import PlanReport, TensorPlan
from .roofline import ChipFigures, estimate
from .topology import require_libtpu, topology_devices

logger = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 2048


def causal_lm_batch(seq_len: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The host batch of a causal LM: input_ids, attention_mask and labels of `seq_len` tokens."""
    return {name: ("int64", (seq_len,)) for name in ("input_ids", "attention_mask", "labels")}


def batch_signature(batch: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape without the batch dim) of one host batch (numpy arrays or lists)."""
    out = {}
    for name, value in batch.items():
        array = np.asarray(value)
        if array.ndim == 0 or array.dtype == object:
            continue
        out[name] = (array.dtype.str, tuple(array.shape[1:]))
    return out


def plan(model: Any, args: Any, tpu_config: str | TpuPreset | None = None, *,
         batch: Mapping[str, tuple[str, tuple[int, ...]]] | None = None, seq_len: int | None = None,
         compute_loss_func: Callable | None = None, optimizers: tuple = (None, None), hooks: Any = None,
         output_dir: str | None = None, replicated_threshold_bytes: int = 1 << 20,
         raise_if_too_big: bool = True) -> PlanReport:
    """Compiles the train step `Trainer.train()` would run on a TPU preset, and reports on it.

    Args:
        model: what the Trainer takes on the JAX backend (a Flax NNX module, LinenModel, FunctionalModel, or a
            torch module through torchax), best built without weights (`nnx.eval_shape(...)`, a torch module on
            the meta device) so that no parameter is materialised.
        args: the TrainingArguments of the run: batch, accumulation, precision, mesh, sharding rules, optimizer.
        tpu_config: the preset (a name in tpu_configs/ or a loaded preset); default `args.tpu_config`.
        batch: name -> (dtype, shape without the batch dim) of one host micro-batch; default a causal-LM batch
            of `seq_len` tokens (see `batch_signature` to read one from real data).
        compute_loss_func, optimizers: as given to the Trainer.
        hooks: a JAX-backend Trainer's `TrainerHooks` (Trainer.plan passes its own, so an overridden
            compute_loss is what is compiled); default the hooks of an unmodified Trainer.
        output_dir: where `plan.json` and the compiled HLO go (default `<args.output_dir>/plan/<preset>`);
            "" writes nothing.
        raise_if_too_big: raise StepDoesNotFit when the step needs more than the chip's HBM (else report fits=False).

    Raises:
        PlanDependencyError: libtpu is not installed (the message says what to install).
        StepDoesNotFit: the step needs more HBM than a chip has; the message names the biggest arrays and
            the settings that would make it fit.
    """
    require_libtpu()
    preset = tpu_config if isinstance(tpu_config, TpuPreset) else load_preset(tpu_config or _required(args))
    devices = topology_devices(preset)
    plan_args = copy.copy(args)
    plan_args.tpu_config = preset.path or preset.name
    backend = PlanningBackend(devices)
    start = time.perf_counter()
    if hooks is None:
        hooks = default_hooks(backend, plan_args, compute_loss_func)
    backend.prepare(model, plan_args, hooks=hooks)
    owner = getattr(hooks, "_trainer", None)
    if isinstance(owner, DefaultHookOwner) and owner.label_names is None:
        owner.label_names = backend.default_label_names()
    steps = max(int(getattr(args, "max_steps", 0) or 0), 1)
    optimizer = optimizers[0] if optimizers[0] is not None else backend.create_optimizer(model)
    scheduler = optimizers[1] if optimizers[1] is not None else backend.create_scheduler(steps, optimizer)
    state = backend.init_state(steps, optimizer, scheduler)
    example = dict(batch) if batch is not None else causal_lm_batch(seq_len or DEFAULT_SEQ_LEN)
    names = backend.model_input_names()
    if getattr(args, "remove_unused_columns", True) and names is not None:
        keep = set(names) | {"labels", "label", "label_ids"} | set(args.label_names or [])
        example = {k: v for k, v in example.items() if k in keep}
    rows = args.per_device_train_batch_size * backend.mesh_config.batch_devices
    window, mask, num_items = backend.abstract_window(example, rows)
    with_items = backend.counts_label_items()[0] and "labels" in window
    jitted = backend.jit_train_step({k: v.sharding for k, v in window.items()}, with_items)
    hbm = int((preset.hbm_gib_per_chip or 0) * GIB)
    # On one device every array is whole: nothing to flag.
    tensors = _tensor_plans(state, replicated_threshold_bytes if len(devices) > 1 else None)
    param_bytes = sum(t.bytes_per_device for t in tensors if t.kind == "param")
    opt_bytes = sum(t.bytes_per_device for t in tensors if t.kind == "optimizer")
    try:
        lowered = jitted.lower(state, window, mask, num_items)
        compiled = lowered.compile()
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is translated
        if not is_resource_exhausted(exc):
            raise
        raise _does_not_fit(preset, args, backend, tensors, param_bytes, opt_bytes, hbm, None, exc) from exc
    seconds = time.perf_counter() - start
    memory = StepMemory.of(compiled)
    fits = not hbm or memory.total <= hbm
    if not fits and raise_if_too_big:
        raise _does_not_fit(preset, args, backend, tensors, param_bytes, opt_bytes, hbm, memory, None)

    text = compiled.as_text()
    stats = hlo_stats.analyze(text)
    seq = _sequence_length(example)
    tokens = args.gradient_accumulation_steps * rows * seq
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    model_flops, formula = model_flops_per_step(model, n_params, tokens, seq)
    model_flops /= len(devices)
    chip = ChipFigures.from_preset(preset)
    ici_bytes = sum(c.ring_bytes for c in stats.collectives.values())
    roofline = estimate(chip, flops=stats.flops, model_flops=model_flops, hbm_bytes=stats.hbm_bytes,
                        ici_bytes=ici_bytes, tokens=tokens / len(devices)).as_dict() if chip else None
    report = PlanReport(
        preset=preset.name, topology=f"{preset.generation} {preset.topology}", devices=len(devices),
        hosts=preset.hosts, mesh=dict(zip(backend.mesh.axis_names, backend.mesh.devices.shape)),
        route=pod_route(model, preset), model=_describe(model), parameters=n_params,
        per_device_batch=args.per_device_train_batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        sequence_length=seq, tokens_per_step=tokens, hbm_bytes=hbm, memory=memory.as_dict(), fits=fits,
        param_bytes_per_device=param_bytes, optimizer_bytes_per_device=opt_bytes, flops_per_device=stats.flops,
        xla_cost_flops_per_device=_cost_flops(compiled), model_flops_per_device=model_flops,
        model_flops_formula=formula, hbm_traffic_bytes=stats.hbm_bytes,
        collectives={k: {"count": c.count, "bytes": c.bytes, "ring_bytes": c.ring_bytes}
                     for k, c in stats.collectives.items()},
        roofline=roofline, chip_sources=chip.sources if chip else {}, tensors=tensors,
        replicated_threshold_bytes=replicated_threshold_bytes, compile_seconds=seconds, versions=_versions(),
    )
    if stats.unknown_custom_calls:
        report.notes.append(f"{stats.unknown_custom_calls} custom kernel call(s) have no FLOP count: the FLOPs above "
                            "leave them out.")
    if preset.env.get("LIBTPU_INIT_ARGS") and os.environ.get("LIBTPU_INIT_ARGS") != preset.env["LIBTPU_INIT_ARGS"]:
        report.notes.append("compiled without the preset's LIBTPU_INIT_ARGS (libtpu reads them once per process: "
                            "export them before planning to compile with them).")
    _write(report, text, output_dir if output_dir is not None else os.path.join(args.output_dir, "plan", preset.name))
    return report


def _required(args) -> str:
    name = getattr(args, "tpu_config", None)
    if not name:
        raise ValueError("Planning needs a TPU preset: pass tpu_config='v5p-128' (see `xtrainer info`), or set it "
                         "in TrainingArguments.")
    return name


def _sequence_length(example: Mapping) -> int:
    for name in ("input_ids", "decoder_input_ids", "labels"):
        if name in example and example[name][1]:
            return int(example[name][1][0])
    shapes = [shape for _, shape in example.values() if shape]
    return int(shapes[0][0]) if shapes else 1


def _tensor_plans(state: dict, threshold: int | None) -> list[TensorPlan]:
    out = []
    for kind, tree in (("param", state["params"]), ("optimizer", state["opt_state"])):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if not hasattr(leaf, "shape") or len(leaf.shape) == 0:
                continue
            size = bytes_per_device(leaf)
            flagged = threshold is not None and replicated_spec(leaf.sharding) and size > threshold
            out.append(TensorPlan(path=_path(path), kind=kind, shape=tuple(leaf.shape), dtype=str(leaf.dtype),
                                  spec=spec_text(leaf.sharding), bytes_per_device=size, flagged=flagged))
    return out


def _path(path) -> str:
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        parts.append(str(name))
    return ".".join(parts)


def model_flops_per_step(model: Any, n_params: int, tokens: int, seq: int) -> tuple[float, str]:
    """Model FLOPs of one step on all devices: 6·N·tokens (N without the input embedding table, a lookup)
    plus 12·layers·attention width·sequence·tokens for the attention scores and values (PaLM, appendix B;
    the full, unmasked sequence, as the reference models compute it)."""
    config = getattr(model, "config", None)
    get = (lambda k, d=None: config.get(k, d)) if isinstance(config, Mapping) else (
        lambda k, d=None: getattr(config, k, d))
    layers = get("num_hidden_layers") or get("num_layers") or 0
    hidden = get("hidden_size") or get("d_model") or 0
    heads = get("num_attention_heads") or get("num_heads") or 0
    head_dim = get("head_dim") or get("head_size") or (hidden // heads if heads else 0)
    vocab = get("vocab_size") or 0
    tied = bool(get("tie_word_embeddings", False))
    dense = n_params - (vocab * hidden if vocab and hidden and not tied else 0)
    attention = 12.0 * layers * heads * head_dim * seq * tokens
    if config is None or not layers:
        return 6.0 * n_params * tokens, "6*N*tokens"
    return 6.0 * dense * tokens + attention, "6*N*tokens + 12*L*H*d*S*tokens"


def _cost_flops(compiled) -> float | None:
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    value = (analysis or {}).get("flops")
    return float(value) if value else None


def _describe(model: Any) -> str:
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is not None and getattr(config, "num_hidden_layers", None):
        return (f"{name}(layers={config.num_hidden_layers}, hidden={config.hidden_size}, "
                f"vocab={getattr(config, 'vocab_size', '?')})")
    return name


def pod_route(model: Any, preset: TpuPreset) -> str:
    """Which backend a run of this model on this preset takes with backend="auto", in words."""
    from ..backends.registry import model_kind, pod_backend

    kind = model_kind(model)
    backend, reason = pod_backend(kind, preset.hosts)
    return f"backend={backend!r}: {reason}"


def _versions() -> dict[str, str]:
    out = {"jax": jax.__version__}
    for dist in ("libtpu", "flax"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _write(report: PlanReport, hlo_text: str, directory: str) -> None:
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    hlo_path = os.path.join(directory, "train_step.hlo.txt")
    with open(hlo_path, "w") as handle:
        handle.write(hlo_text)
    report.files = {"json": os.path.join(directory, "plan.json"), "hlo": hlo_path}
    report.write_json(report.files["json"])


def _does_not_fit(preset, args, backend, tensors, param_bytes, opt_bytes, hbm, memory, exc) -> StepDoesNotFit:
    needed = memory.total if memory is not None else _needed_from_error(exc)
    biggest = sorted(tensors, key=lambda t: -t.bytes_per_device)[:5]
    lines = [
        f"The train step does not fit on {preset.name}: it needs "
        f"{f'{needed / GIB:.2f} GiB' if needed else 'more than the'} "
        f"{'' if needed else 'HBM '}per device{f', the chip has {hbm / GIB:.2f} GiB' if hbm else ''} "
        f"(parameters {param_bytes / GIB:.2f} GiB, optimizer state {opt_bytes / GIB:.2f} GiB"
        + (f", temporaries {memory.temporaries / GIB:.2f} GiB" if memory is not None else "") + ").",
        "Biggest arrays of the state, per device:",
        *[f"  {t.kind} {t.path} {list(t.shape)} {t.dtype} {t.spec}: {t.bytes_per_device / GIB:.3f} GiB"
          for t in biggest],
    ]
    allocations = compiler_allocations(exc) if exc is not None else []
    if allocations:
        lines += ["Largest allocations the TPU compiler reported:", *[f"  {a}" for a in allocations]]
    remat = bool(getattr(args, "activation_checkpointing", False)) or bool(
        getattr(getattr(backend.model, "config", None), "remat", False))
    lines += ["To make it fit:", *[f"  - {k}" for k in fit_knobs(
        per_device_batch=args.per_device_train_batch_size, remat=remat,
        mesh=dict(zip(backend.mesh.axis_names, backend.mesh.devices.shape)), optimizer_bytes=opt_bytes,
        param_bytes=param_bytes)]]
    return StepDoesNotFit("\n".join(lines), needed=needed, available=hbm or None)


def _needed_from_error(exc) -> int | None:
    match = re.search(r"Used ([\d.]+)([GMK])", str(exc or ""))
    if not match:
        return None
    return int(float(match.group(1)) * {"G": GIB, "M": 2**20, "K": 2**10}[match.group(2)])


def largest_fitting_batch(make_plan: Callable[[int], PlanReport], start: int, limit: int = 4096) -> tuple[int, PlanReport | None]:
    """The largest per-device batch whose step fits, by compiling plans (doubling up, then bisecting).

    Args:
        make_plan: per-device batch -> its PlanReport (raising StepDoesNotFit when it does not fit).
        start: the batch to try first.
    Returns:
        (batch, its report), or (0, None) when not even a batch of 1 fits.
    """
    fits: dict[int, PlanReport | None] = {}

    def probe(batch: int) -> bool:
        if batch not in fits:
            try:
                fits[batch] = make_plan(batch)
            except StepDoesNotFit:
                fits[batch] = None
        return fits[batch] is not None

    low, high = 0, None  # low fits (0: none known), high does not fit
    batch = max(1, start)
    while batch <= limit:
        if probe(batch):
            low = batch
            batch *= 2
        else:
            high = batch
            break
    if high is None:
        return low, fits.get(low)
    if low == 0:  # the first try did not fit: search below it
        low_candidate = 1
        if not probe(1):
            return 0, None
        low = low_candidate
    while high - low > 1:
        middle = (low + high) // 2
        if probe(middle):
            low = middle
        else:
            high = middle
    return low, fits[low]
