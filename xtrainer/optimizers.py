"""`optim` names: which backend runs which, and transformers' optimizer class + kwargs for torch.

Two things live here, and neither imports jax (torch only when a torch optimizer is asked for):

* :data:`SUPPORT`, the optimizer x backend table: for each transformers 5.x `optim` value and each backend
  (torch, torch_xla, jax), what runs it (a library class or an optax transformation) or why it cannot run
  there. :func:`check_optimizer` turns it into the construction-time error (the value, the backend and the
  alternatives), :func:`support_table_markdown` into docs/optimizers.md.
* :func:`get_optimizer_cls_and_kwargs`, transformers' `Trainer.get_optimizer_cls_and_kwargs`: the torch
  optimizer class and its kwargs, with the same argument handling (`optim_args` parsing, `adam_*` betas/eps,
  GaLore/APOLLO target modules from `optim_target_modules`, LOMO's model, layer-wise variants), built on the
  libraries transformers uses. The torch backends instantiate it in `backends/torch/optim.py`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
from typing import Any

from .schedules import METRIC_DRIVEN
from .trainer_utils import OptimizerNames

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS", "SUPPORT", "Support", "check_optimizer", "check_optimizer_setup", "get_optimizer_cls_and_kwargs",
    "optimizer_names",
    "parse_optim_args", "support_table_markdown", "supported_optimizers",
]

BACKENDS = ("torch", "torch_xla", "jax")
#: The pip extra that installs every optimizer library (pyproject.toml).
EXTRA = "optimizers"


@dataclasses.dataclass(frozen=True)
class Support:
    """How one `optim` value runs on one backend, or why it cannot.

    Attributes:
        runs_as: what does the update (e.g. ``bitsandbytes.optim.AdamW (8-bit)``, ``optax.adamw``); None
            where the value cannot run on that backend.
        library: the pip distribution it needs beyond the backend's own stack, if any.
        devices: torch device types it needs (empty: any).
        reason: why it cannot run (when ``runs_as`` is None), or a note on how it runs.
    """

    runs_as: str | None
    library: str | None = None
    devices: tuple[str, ...] = ()
    reason: str = ""

    @property
    def supported(self) -> bool:
        return self.runs_as is not None


def _no(reason: str) -> Support:
    return Support(None, reason=reason)


O = OptimizerNames
_BNB_NOT_XLA = _no("bitsandbytes' kernels are custom CPU/CUDA operators that torch_xla cannot trace")
_BNB_NOT_JAX = _no("bitsandbytes' quantized or paged optimizer states have no optax counterpart")
_TORCH_ONLY_MODULES = _no("it works on torch nn.Linear modules and autograd hooks, which a JAX train step does not have")


def _bnb(cls: str, bits: int, paged: bool = False) -> Support:
    note = "paging is CUDA memory; on CPU bitsandbytes says so once and runs unpaged" if paged else ""
    return Support(f"bitsandbytes.optim.{cls} ({bits}-bit{', paged' if paged else ''})", "bitsandbytes", reason=note)


def _galore_support(cls: str, layerwise: bool, cuda_only: bool = False) -> dict:
    runs = f"galore_torch.{cls}" + (" (one optimizer per parameter, stepped in gradient hooks)" if layerwise else "")
    devices = ("cuda",) if cuda_only else ()
    xla = _no("GaLore's 8-bit update calls CUDA kernels") if cuda_only else Support(runs, "galore-torch")
    return {"torch": Support(runs, "galore-torch", devices=devices,
                             reason="its 8-bit update calls CUDA kernels" if cuda_only else ""),
            "torch_xla": xla, "jax": _TORCH_ONLY_MODULES}


_ADAMW = {"torch": Support("torch.optim.AdamW"), "torch_xla": Support("torch.optim.AdamW"),
          "jax": Support("optax.adamw")}
_SCHEDULE_FREE_NOTE = ("optimizer.train()/eval() switch the weights around training and evaluation, as in transformers")

#: optim value -> backend -> Support. Every OptimizerNames member has a row (test_optimizers checks it).
SUPPORT: dict[OptimizerNames, dict[str, Support]] = {
    O.ADAMW_TORCH: _ADAMW,
    O.ADAMW: {k: dataclasses.replace(v, reason="xtrainer's alias of adamw_torch") for k, v in _ADAMW.items()},
    O.ADAMW_TORCH_FUSED: {
        "torch": Support("torch.optim.AdamW (fused=True)"),
        "torch_xla": Support("torch.optim.AdamW", reason="torch's fused kernels have no XLA version; XLA fuses the "
                             "plain update itself"),
        "jax": Support("optax.adamw", reason="XLA fuses the update"),
    },
    O.ADAMW_TORCH_XLA: {
        "torch": _no("torch_xla's syncfree AdamW runs on XLA devices only; use backend='torch_xla', or adamw_torch"),
        "torch_xla": Support("torch_xla.amp.syncfree.AdamW"),
        "jax": Support("optax.adamw", reason="the same AdamW update, compiled by XLA"),
    },
    O.ADAMW_TORCH_NPU_FUSED: {
        b: _no("it is torch_npu's kernel for Ascend NPUs, which xtrainer has no backend for") for b in BACKENDS
    },
    O.ADAFACTOR: {
        "torch": Support("transformers.optimization.Adafactor"),
        "torch_xla": Support("transformers.optimization.Adafactor"),
        "jax": Support("optax.adafactor", reason="transformers' settings: factored second moments of every "
                       "matrix, no parameter scaling, lr-scaled weight decay"),
    },
    O.ADAMW_ANYPRECISION: {
        b: _no("its library, torchdistx, has no release for current torch (it is not on PyPI)") for b in BACKENDS
    },
    O.ADAMW_TORCH_4BIT: {"torch": Support("torchao.optim.AdamW4bit", "torchao"),
                         "torch_xla": _no("torchao's quantized optimizer states are tensor subclasses torch_xla "
                                          "cannot trace"),
                         "jax": _no("torchao's 4-bit optimizer states have no optax counterpart")},
    O.ADAMW_TORCH_8BIT: {"torch": Support("torchao.optim.AdamW8bit", "torchao"),
                         "torch_xla": _no("torchao's quantized optimizer states are tensor subclasses torch_xla "
                                          "cannot trace"),
                         "jax": _no("torchao's 8-bit optimizer states have no optax counterpart")},
    O.ADEMAMIX: {"torch": _bnb("AdEMAMix", 32), "torch_xla": _BNB_NOT_XLA,
                 "jax": Support("optax.contrib.ademamix")},
    O.ADEMAMIX_8BIT: {"torch": _bnb("AdEMAMix", 8), "torch_xla": _BNB_NOT_XLA, "jax": _BNB_NOT_JAX},
    O.PAGED_ADEMAMIX: {"torch": _bnb("AdEMAMix", 32, paged=True), "torch_xla": _BNB_NOT_XLA, "jax": _BNB_NOT_JAX},
    O.PAGED_ADEMAMIX_8BIT: {"torch": _bnb("AdEMAMix", 8, paged=True), "torch_xla": _BNB_NOT_XLA,
                            "jax": _BNB_NOT_JAX},
    O.SGD: {"torch": Support("torch.optim.SGD"), "torch_xla": Support("torch.optim.SGD"),
            "jax": Support("optax.sgd", reason="weight decay added to the gradient, as torch.optim.SGD")},
    O.ADAGRAD: {"torch": Support("torch.optim.Adagrad"), "torch_xla": Support("torch.optim.Adagrad"),
                "jax": Support("optax.adagrad", reason="torch's defaults: no initial accumulator, eps outside the root")},
    O.RMSPROP: {"torch": Support("torch.optim.RMSprop"), "torch_xla": Support("torch.optim.RMSprop"),
                "jax": Support("optax.rmsprop", reason="torch's defaults: eps outside the root")},
    O.ADAMW_BNB: {"torch": _bnb("AdamW", 8), "torch_xla": _BNB_NOT_XLA, "jax": _BNB_NOT_JAX},
    O.ADAMW_8BIT: {"torch": _bnb("AdamW", 8), "torch_xla": _BNB_NOT_XLA, "jax": _BNB_NOT_JAX},
    O.PAGED_ADAMW: {"torch": _bnb("AdamW", 32, paged=True), "torch_xla": _BNB_NOT_XLA, "jax": _BNB_NOT_JAX},
    O.PAGED_ADAMW_8BIT: {"torch": _bnb("AdamW", 8, paged=True), "torch_xla": _BNB_NOT_XLA, "jax": _BNB_NOT_JAX},
    O.LION: {"torch": _bnb("Lion", 32),
             "torch_xla": Support("xtrainer Lion (plain torch ops, the update of bitsandbytes' 32-bit Lion)"),
             "jax": Support("optax.lion")},
    O.LION_SHORT: {"torch": dataclasses.replace(_bnb("Lion", 32), reason="xtrainer's alias of lion_32bit"),
                   "torch_xla": Support("xtrainer Lion", reason="xtrainer's alias of lion_32bit"),
                   "jax": Support("optax.lion", reason="xtrainer's alias of lion_32bit")},
    O.LION_8BIT: {"torch": _bnb("Lion", 8), "torch_xla": _BNB_NOT_XLA, "jax": _BNB_NOT_JAX},
    O.PAGED_LION: {"torch": _bnb("Lion", 32, paged=True), "torch_xla": _BNB_NOT_XLA, "jax": _BNB_NOT_JAX},
    O.PAGED_LION_8BIT: {"torch": _bnb("Lion", 8, paged=True), "torch_xla": _BNB_NOT_XLA, "jax": _BNB_NOT_JAX},
    O.RMSPROP_BNB: {"torch": _bnb("RMSprop", 32), "torch_xla": _BNB_NOT_XLA,
                    "jax": Support("optax.rmsprop", reason="bitsandbytes' 32-bit RMSprop is torch's update")},
    O.RMSPROP_32BIT: {"torch": _bnb("RMSprop", 32), "torch_xla": _BNB_NOT_XLA,
                      "jax": Support("optax.rmsprop", reason="bitsandbytes' 32-bit RMSprop is torch's update")},
    O.RMSPROP_8BIT: {"torch": _bnb("RMSprop", 8), "torch_xla": _BNB_NOT_XLA, "jax": _BNB_NOT_JAX},
    O.GALORE_ADAMW: _galore_support("GaLoreAdamW", False),
    O.GALORE_ADAMW_8BIT: _galore_support("GaLoreAdamW8bit", False, cuda_only=True),
    O.GALORE_ADAFACTOR: _galore_support("GaLoreAdafactor", False),
    O.GALORE_ADAMW_LAYERWISE: _galore_support("GaLoreAdamW", True),
    O.GALORE_ADAMW_8BIT_LAYERWISE: _galore_support("GaLoreAdamW8bit", True, cuda_only=True),
    O.GALORE_ADAFACTOR_LAYERWISE: {
        **_galore_support("GaLoreAdafactor", True),
        "torch": Support("galore_torch.GaLoreAdafactor (one optimizer per parameter, stepped in gradient hooks)",
                         "galore-torch", reason="transformers 5.x fails to build it (its per-parameter Adafactors "
                         "refuse the lr); xtrainer gives them transformers' Adafactor settings"),
    },
    O.LOMO: {"torch": Support("lomo_optim.Lomo (update fused into backward)", "lomo-optim"),
             "torch_xla": _no("LOMO updates the weights inside the backward pass, which the torch_xla step "
                              "compiles as one graph; use backend='torch'"),
             "jax": _TORCH_ONLY_MODULES},
    O.ADALOMO: {"torch": Support("lomo_optim.AdaLomo (update fused into backward)", "lomo-optim", devices=("cuda",),
                                 reason="lomo_optim allocates AdaLomo's states with .cuda()"),
                "torch_xla": _no("AdaLomo updates the weights inside the backward pass, which the torch_xla step "
                                 "compiles as one graph; use backend='torch'"),
                "jax": _TORCH_ONLY_MODULES},
    O.GROKADAMW: {"torch": Support("grokadamw.GrokAdamW", "grokadamw"),
                  "torch_xla": Support("grokadamw.GrokAdamW", "grokadamw"),
                  "jax": _no("GrokAdamW has no optax implementation")},
    O.SCHEDULE_FREE_RADAM: {
        "torch": Support("schedulefree.RAdamScheduleFree", "schedulefree", reason=_SCHEDULE_FREE_NOTE),
        "torch_xla": Support("schedulefree.RAdamScheduleFree", "schedulefree", reason=_SCHEDULE_FREE_NOTE),
        "jax": _no("optax has schedule-free AdamW and SGD but no schedule-free RAdam"),
    },
    O.SCHEDULE_FREE_ADAMW: {
        "torch": Support("schedulefree.AdamWScheduleFree", "schedulefree", reason=_SCHEDULE_FREE_NOTE),
        "torch_xla": Support("schedulefree.AdamWScheduleFree", "schedulefree", reason=_SCHEDULE_FREE_NOTE),
        "jax": Support("optax.contrib.schedule_free_adamw", reason="evaluation uses the averaged weights, as "
                       "optimizer.eval() does on torch"),
    },
    O.SCHEDULE_FREE_SGD: {
        "torch": Support("schedulefree.SGDScheduleFree", "schedulefree", reason=_SCHEDULE_FREE_NOTE),
        "torch_xla": Support("schedulefree.SGDScheduleFree", "schedulefree", reason=_SCHEDULE_FREE_NOTE),
        "jax": Support("optax.contrib.schedule_free_sgd", reason="evaluation uses the averaged weights, as "
                       "optimizer.eval() does on torch"),
    },
    O.APOLLO_ADAMW: {"torch": Support("apollo_torch.APOLLOAdamW", "apollo-torch"),
                     "torch_xla": _no("APOLLO draws its projections with a torch.Generator on the parameter's "
                                      "device, and XLA devices have none"),
                     "jax": _TORCH_ONLY_MODULES},
    O.APOLLO_ADAMW_LAYERWISE: {
        "torch": Support("apollo_torch.APOLLOAdamW (one optimizer per parameter, stepped in gradient hooks)",
                         "apollo-torch"),
        "torch_xla": _no("APOLLO draws its projections with a torch.Generator on the parameter's device, and XLA "
                         "devices have none"),
        "jax": _TORCH_ONLY_MODULES,
    },
    O.STABLE_ADAMW: {"torch": Support("optimi.StableAdamW", "torch-optimi", reason="its Triton kernels on CUDA, its "
                                      "foreach update elsewhere"),
                     "torch_xla": Support("optimi.StableAdamW (foreach, without Triton)", "torch-optimi",
                                          reason="Triton kernels do not run on XLA devices"),
                     "jax": _no("StableAdamW has no optax implementation")},
}

# The import name of each library, for the availability check.
_MODULE_OF = {"bitsandbytes": "bitsandbytes", "galore-torch": "galore_torch", "lomo-optim": "lomo_optim",
              "grokadamw": "grokadamw", "schedulefree": "schedulefree", "apollo-torch": "apollo_torch",
              "torch-optimi": "optimi", "torchao": "torchao"}


def optimizer_names() -> list[str]:
    """Every `optim` value xtrainer knows (transformers' names and xtrainer's two aliases)."""
    return [name.value for name in OptimizerNames]


def supported_optimizers(backend: str, device_type: str | None = None) -> list[str]:
    """The `optim` values that can run on `backend` (on a torch `device_type`, if given)."""
    out = []
    for name, row in SUPPORT.items():
        entry = row[backend]
        if entry.supported and (device_type is None or not entry.devices or device_type in entry.devices):
            out.append(name.value)
    return out


def _library_installed(library: str) -> bool:
    return importlib.util.find_spec(_MODULE_OF.get(library, library)) is not None


def check_optimizer(optim, backend: str, device_type: str | None = None, check_library: bool = True) -> Support:
    """Refuses an `optim` value that cannot run on `backend`, with the value, the backend and the alternatives.

    Args:
        optim: an OptimizerNames member or its string value.
        backend: "torch", "torch_xla" or "jax".
        device_type: the torch device type the run uses ("cpu", "cuda"), for device-bound optimizers.
        check_library: also require the library that runs it to be importable.

    Returns:
        The :class:`Support` entry that will run it.

    Raises:
        ValueError: the value cannot run on this backend / device (the message lists those that can, and
            the backends where this one runs).
        MissingExtraError (an ImportError): its library is not installed (the message names the pip extra).
    """
    name = OptimizerNames(getattr(optim, "value", optim))
    entry = SUPPORT[name][backend]
    device_bound = entry.supported and device_type is not None and entry.devices and device_type not in entry.devices
    if not entry.supported or device_bound:
        where = f"backend='{backend}'" + (f" on {device_type}" if device_bound else "")
        why = entry.reason if not device_bound else f"it needs a {'/'.join(entry.devices)} device: {entry.reason}"
        elsewhere = [b for b in BACKENDS if b != backend and SUPPORT[name][b].supported]
        raise ValueError(
            f"optim='{name.value}' cannot run on {where}: {why}. "
            + (f"It runs on backend={' or '.join(repr(b) for b in elsewhere)}. " if elsewhere else "")
            + f"Optimizers that run on {where}: {', '.join(supported_optimizers(backend, device_type))} "
            "(see docs/optimizers.md)."
        )
    if check_library and entry.library and not _library_installed(entry.library):
        from .extras import MissingExtraError, install_hint

        raise MissingExtraError(
            f"optim='{name.value}' on backend='{backend}' runs {entry.runs_as}, which needs the `{entry.library}` "
            f"package: {install_hint(EXTRA)} (or pip install {entry.library})."
        )
    return entry


def support_table_markdown() -> str:
    """docs/optimizers.md: the optimizer x backend table, generated from :data:`SUPPORT`."""
    lines = [
        "# Optimizers and backends",
        "",
        "<!-- Generated from xtrainer/optimizers.py by `python -c \"import xtrainer.optimizers as o; "
        "print(o.support_table_markdown(), end='')\" > docs/optimizers.md`; tests/unit/test_optimizers.py fails "
        "when this file and the code differ. -->",
        "",
        "Every `optim` value of transformers 5.x (and xtrainer's aliases `adamw`, `lion`), on each backend: what "
        "runs it, or why it cannot run there. A value that cannot run on the chosen backend fails when the "
        "`Trainer` is built, naming the values that can. The libraries come with "
        f"`pip install 'xtrainer[{EXTRA}]'`; on torch the optimizer class and its arguments are those of transformers' "
        "`Trainer.get_optimizer_cls_and_kwargs` (one exception, said in its row).",
        "",
        "| optim | torch | torch_xla | jax |",
        "| --- | --- | --- | --- |",
    ]

    def cell(entry: Support) -> str:
        if not entry.supported:
            return f"no: {entry.reason}"
        text = f"`{entry.runs_as}`"
        if entry.devices:
            text += f" ({'/'.join(entry.devices)} only: {entry.reason})"
        elif entry.reason:
            text += f" ({entry.reason})"
        return text.replace("|", "\\|")

    for name, row in SUPPORT.items():
        lines.append(f"| `{name.value}` | " + " | ".join(cell(row[b]) for b in BACKENDS) + " |")
    libraries = sorted({e.library for row in SUPPORT.values() for e in row.values() if e.library})
    lines += ["", "Libraries (extra `optimizers`): " + ", ".join(f"`{lib}`" for lib in libraries) + ".", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- torch classes


def parse_optim_args(optim_args: str | None) -> dict[str, str]:
    """`optim_args` ("k1=v1,k2=v2", spaces ignored) as a dict of strings, as transformers parses it."""
    if not optim_args:
        return {}
    parsed = {}
    for item in optim_args.replace(" ", "").split(","):
        key, sep, value = item.partition("=")
        if not sep or "=" in value:
            raise ValueError(f"optim_args must look like 'key=value,key=value'; cannot parse {item!r} in {optim_args!r}.")
        parsed[key] = value
    return parsed


def _strtobool(value: str) -> bool:
    value = str(value).lower()
    if value in ("y", "yes", "t", "true", "on", "1"):
        return True
    if value in ("n", "no", "f", "false", "off", "0"):
        return False
    raise ValueError(f"invalid truth value {value!r}")


@dataclasses.dataclass
class _Context:
    args: Any
    model: Any
    kwargs: dict  # starts as {"lr": learning_rate}
    adam: dict  # {"betas": (adam_beta1, adam_beta2), "eps": adam_epsilon}
    optim_args: dict


def _adamw(ctx):
    import torch

    ctx.kwargs.update(ctx.adam)
    if ctx.args.optim == O.ADAMW_TORCH_FUSED:
        ctx.kwargs["fused"] = True
    return torch.optim.AdamW, ctx.kwargs


def _adamw_torch_xla(ctx):
    try:
        from torch_xla.amp.syncfree import AdamW
    except ImportError:
        raise ValueError("optim='adamw_torch_xla' needs torch_xla (its syncfree AdamW); use adamw_torch.") from None
    ctx.kwargs.update(ctx.adam)
    return AdamW, ctx.kwargs


def _adafactor(ctx):
    from transformers.optimization import Adafactor

    ctx.kwargs.update({"scale_parameter": False, "relative_step": False})
    return Adafactor, ctx.kwargs


def _float_options(ctx, keys):
    kwargs = dict(ctx.kwargs)
    for key in keys:
        if key in ctx.optim_args:
            kwargs[key] = float(ctx.optim_args[key])
    return kwargs


def _flag(text: str) -> bool:
    return text.lower() in ("true", "1", "yes")


def _sgd(ctx):
    import torch

    kwargs = _float_options(ctx, ("momentum", "dampening", "weight_decay"))
    if "nesterov" in ctx.optim_args:
        kwargs["nesterov"] = _flag(ctx.optim_args["nesterov"])
    return torch.optim.SGD, kwargs


def _adagrad(ctx):
    import torch

    return torch.optim.Adagrad, _float_options(ctx, ("lr_decay", "weight_decay", "eps"))


def _rmsprop(ctx):
    import torch

    kwargs = _float_options(ctx, ("momentum", "alpha", "eps", "weight_decay"))
    if "centered" in ctx.optim_args:
        kwargs["centered"] = _flag(ctx.optim_args["centered"])
    return torch.optim.RMSprop, kwargs


def _bitsandbytes(ctx):
    from bitsandbytes.optim import AdamW, Lion, RMSprop

    name = ctx.args.optim.value
    if "adam" in name:  # adamw_bnb_8bit, adamw_8bit, paged_adamw_* ("ademamix" does not contain "adam")
        cls, extra = AdamW, ctx.adam
    elif "lion" in name:
        cls, extra = Lion, {"betas": (ctx.args.adam_beta1, ctx.args.adam_beta2)}
    elif "rmsprop" in name:
        cls, extra = RMSprop, ctx.optim_args  # transformers hands the raw optim_args strings to RMSprop
    else:  # ademamix, ademamix_8bit, paged_ademamix_*
        from bitsandbytes.optim import AdEMAMix

        args, opts = ctx.args, ctx.optim_args
        cls = AdEMAMix
        extra = {
            "betas": (float(opts.get("beta1", args.adam_beta1)), float(opts.get("beta2", args.adam_beta2)),
                      float(opts.get("beta3", 0.9999))),
            "alpha": float(opts.get("alpha", 5.0)),
            "eps": float(opts.get("eps", args.adam_epsilon)),
        }
        for key in ("t_alpha", "t_beta3"):
            if key in opts:
                extra[key] = int(opts[key])
    bnb = {"optim_bits": 8 if "8bit" in name else 32}
    if "rmsprop" not in name:
        bnb["is_paged"] = "paged" in name
    ctx.kwargs.update(extra)
    ctx.kwargs.update(bnb)
    return cls, ctx.kwargs


def _matches_target(targets, module_name: str) -> tuple[bool, bool]:
    """(module matches optim_target_modules, the match came from a regex), transformers' rules."""
    if isinstance(targets, str):
        return bool(re.fullmatch(targets, module_name)), targets != module_name
    if module_name in targets or any(t in module_name for t in targets):
        return True, False
    if any(re.fullmatch(t, module_name) for t in targets):
        return True, True
    return False, False


def _low_rank(ctx, cls, group_kwargs: dict, layerwise_in_ddp: bool = True):
    """GaLore / APOLLO: the projected optimizer on targeted Linear weights, plain on the rest."""
    import torch
    from torch import nn

    args, model, name = ctx.args, ctx.model, ctx.args.optim.value
    layerwise = name.endswith("layerwise")
    if layerwise and layerwise_in_ddp and getattr(args, "world_size", 1) > 1:
        raise NotImplementedError(f"Layer-wise {name} does not support distributed (DDP) training")
    targets = args.optim_target_modules
    if targets is None:
        raise ValueError(f"optim='{name}' needs `optim_target_modules` (module names, a regex or 'all-linear').")
    if not isinstance(targets, (list, str)):
        raise TypeError(f"`optim_target_modules` must be a list of strings, a regex string, or 'all-linear'. Got: {targets}")
    if model is None:
        raise ValueError(f"optim='{name}' needs the model (get_optimizer_cls_and_kwargs(args, model)).")
    all_linear = isinstance(targets, str) and targets.replace("_", "-") == "all-linear"
    target_names = []
    for module_name, module in model.named_modules():
        found, is_regex = _matches_target(targets, module_name)
        if not isinstance(module, nn.Linear):
            if found and not is_regex:
                logger.warning("%s matched but ignored. %s only supports linear layers.", module_name, name)
            continue
        if found or all_linear:
            target_names.append(module_name + ".weight")
    if not target_names:
        raise ValueError(f"optim='{name}': no nn.Linear module matches optim_target_modules={targets!r}.")
    named = list(model.named_parameters())
    target = [p for n, p in named if n in target_names]
    rest = [p for n, p in named if n not in target_names]
    groups = [{"params": rest}, {"params": target, **group_kwargs}]
    kwargs = ctx.kwargs
    if layerwise:
        if args.gradient_accumulation_steps != 1:
            raise ValueError(f"Layerwise {name} does not support gradient accumulation!")
        from transformers.trainer_pt_utils import LayerWiseDummyOptimizer

        per_param = {p: cls([{"params": [p]}], **kwargs) for p in rest}
        per_param.update({p: cls([{"params": [p], **group_kwargs}], **kwargs) for p in target})

        def step_parameter(param: torch.Tensor) -> None:  # the whole update of one parameter, in backward
            if param.grad is not None:
                per_param[param].step()
                per_param[param].zero_grad()

        for param in model.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(step_parameter)
        cls = LayerWiseDummyOptimizer
        kwargs["optimizer_dict"] = per_param
    kwargs["params"] = groups
    return cls, kwargs


def _galore(ctx):
    from galore_torch import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

    name = ctx.args.optim.value
    cls = GaLoreAdafactor if "adafactor" in name else GaLoreAdamW8bit if "8bit" in name else GaLoreAdamW
    opts = ctx.optim_args
    group_kwargs = {"rank": int(opts.pop("rank", 128)), "update_proj_gap": int(opts.pop("update_proj_gap", 200)),
                    "scale": float(opts.pop("scale", 0.25)), "proj_type": opts.pop("proj_type", "std")}
    if ctx.args.optim == O.GALORE_ADAFACTOR_LAYERWISE:
        # transformers sets these after building the per-parameter optimizers, which then refuse the explicit lr
        # ("Cannot combine manual `lr` and `relative_step=True`"): here they get them, so the value runs.
        ctx.kwargs.update({"scale_parameter": False, "relative_step": False})
    cls, kwargs = _low_rank(ctx, cls, group_kwargs)
    if ctx.args.optim == O.GALORE_ADAFACTOR:
        kwargs.update({"scale_parameter": False, "relative_step": False})
    return cls, kwargs


def _apollo(ctx):
    from apollo_torch import APOLLOAdamW

    opts = ctx.optim_args
    group_kwargs = {"rank": int(opts.pop("rank", 128)), "proj": opts.pop("proj", "random"),
                    "scale_type": opts.pop("scale_type", "channel"),
                    "update_proj_gap": int(opts.pop("update_proj_gap", 200)), "scale": float(opts.pop("scale", 1.0)),
                    "proj_type": opts.pop("proj_type", "std"), **ctx.adam}
    return _low_rank(ctx, APOLLOAdamW, group_kwargs)


def _lomo(ctx):
    if ctx.model is None:
        raise ValueError(f"optim='{ctx.args.optim.value}' needs the model (get_optimizer_cls_and_kwargs(args, model)).")
    from lomo_optim import AdaLomo, Lomo

    ctx.kwargs["model"] = ctx.model
    return (AdaLomo if "ada" in ctx.args.optim.value else Lomo), ctx.kwargs


def _grokadamw(ctx):
    from grokadamw import GrokAdamW

    opts = ctx.optim_args
    ctx.kwargs.update({
        "alpha_init": float(opts.get("alpha_init", 0.98)), "lamb": float(opts.get("lamb", 2.0)),
        "gamma": float(opts.get("gamma", 0.1)),
        "grokking_signal_decay_rate": float(opts.get("grokking_signal_decay_rate", 0.1)),
        "gradient_clipping": float(opts.get("gradient_clipping", 1.0)),
    })
    return GrokAdamW, ctx.kwargs


def _torchao(ctx):
    from torchao.optim import AdamW4bit, AdamW8bit

    cls = AdamW4bit if ctx.args.optim == O.ADAMW_TORCH_4BIT else AdamW8bit
    ctx.kwargs.update({"block_size": ctx.optim_args.get("block_size", 256),
                       "bf16_stochastic_round": _strtobool(ctx.optim_args.get("bf16_stochastic_round", "False"))})
    ctx.kwargs.update(ctx.adam)
    return cls, ctx.kwargs


def _schedule_free(ctx):
    import schedulefree

    args, extra = ctx.args, {}
    if args.optim == O.SCHEDULE_FREE_RADAM:
        cls, extra = schedulefree.RAdamScheduleFree, ctx.adam  # RAdam warms up by itself: no warmup_steps
    elif args.optim == O.SCHEDULE_FREE_ADAMW:
        cls, extra = schedulefree.AdamWScheduleFree, ctx.adam
    else:
        cls = schedulefree.SGDScheduleFree
    extra["weight_decay"] = args.weight_decay
    if args.optim != O.SCHEDULE_FREE_RADAM:
        extra["warmup_steps"] = args.warmup_steps
    extra["weight_lr_power"] = float(ctx.optim_args.get("weight_lr_power", 2.0))
    extra["r"] = float(ctx.optim_args.get("r", 0.0))
    ctx.kwargs.update(extra)
    return cls, ctx.kwargs


def _stable_adamw(ctx):
    from optimi import StableAdamW

    opts = ctx.optim_args
    max_lr = opts.pop("max_lr", None)
    kahan_sum = opts.pop("kahan_sum", None)
    ctx.adam["weight_decay"] = ctx.args.weight_decay
    ctx.kwargs.update(ctx.adam)
    # bool() of the raw strings, as transformers does: any non-empty value (even "False") reads as True.
    ctx.kwargs.update({"decouple_lr": bool(opts.pop("decouple_lr", False)),
                       "max_lr": None if max_lr is None else float(max_lr),
                       "kahan_sum": None if kahan_sum is None else bool(kahan_sum)})
    return StableAdamW, ctx.kwargs


def _adamw_alias(ctx):
    ctx.kwargs.update(ctx.adam)
    import torch

    return torch.optim.AdamW, ctx.kwargs


def _lion_alias(ctx):
    ctx.args = _Renamed(ctx.args, O.LION)
    return _bitsandbytes(ctx)


class _Renamed:
    """TrainingArguments seen with another `optim` (xtrainer's aliases resolve to transformers' names)."""

    def __init__(self, args, optim):
        self._args, self.optim = args, optim

    def __getattr__(self, name):
        return getattr(self._args, name)


_BNB_NAMES = (O.ADAMW_BNB, O.ADAMW_8BIT, O.PAGED_ADAMW, O.PAGED_ADAMW_8BIT, O.ADEMAMIX, O.ADEMAMIX_8BIT,
              O.PAGED_ADEMAMIX, O.PAGED_ADEMAMIX_8BIT, O.LION, O.LION_8BIT, O.PAGED_LION, O.PAGED_LION_8BIT,
              O.RMSPROP_BNB, O.RMSPROP_8BIT, O.RMSPROP_32BIT)
_HANDLERS = {
    O.ADAFACTOR: _adafactor, O.ADAMW_TORCH: _adamw, O.ADAMW_TORCH_FUSED: _adamw, O.ADAMW_TORCH_XLA: _adamw_torch_xla,
    O.SGD: _sgd, O.ADAGRAD: _adagrad, O.RMSPROP: _rmsprop, O.GROKADAMW: _grokadamw, O.STABLE_ADAMW: _stable_adamw,
    O.LOMO: _lomo, O.ADALOMO: _lomo, O.ADAMW: _adamw_alias, O.LION_SHORT: _lion_alias,
    **dict.fromkeys(_BNB_NAMES, _bitsandbytes),
    **dict.fromkeys((O.GALORE_ADAMW, O.GALORE_ADAMW_8BIT, O.GALORE_ADAFACTOR, O.GALORE_ADAMW_LAYERWISE,
                     O.GALORE_ADAMW_8BIT_LAYERWISE, O.GALORE_ADAFACTOR_LAYERWISE), _galore),
    **dict.fromkeys((O.APOLLO_ADAMW, O.APOLLO_ADAMW_LAYERWISE), _apollo),
    **dict.fromkeys((O.ADAMW_TORCH_4BIT, O.ADAMW_TORCH_8BIT), _torchao),
    **dict.fromkeys((O.SCHEDULE_FREE_RADAM, O.SCHEDULE_FREE_ADAMW, O.SCHEDULE_FREE_SGD), _schedule_free),
}


def get_optimizer_cls_and_kwargs(args, model=None) -> tuple[Any, dict[str, Any]]:
    """The torch optimizer class and kwargs for `args.optim`: transformers' `Trainer.get_optimizer_cls_and_kwargs`.

    Args:
        args: TrainingArguments (optim, optim_args, learning_rate, adam_beta1/2, adam_epsilon, weight_decay,
            warmup_steps, optim_target_modules, gradient_accumulation_steps).
        model: the torch model; GaLore and APOLLO (their target modules) and LOMO (the model itself) need it.

    Returns:
        (optimizer class, kwargs). The kwargs start from ``{"lr": learning_rate}``; ``params`` in them replaces
        the decay/no-decay groups (GaLore, APOLLO), ``model`` is LOMO's first argument, ``optimizer_dict`` the
        per-parameter optimizers of a layer-wise variant (whose class is transformers' LayerWiseDummyOptimizer).
        A layer-wise variant registers its gradient hooks on the model here, as in transformers.

    Raises:
        ValueError: a value transformers cannot instantiate either (adamw_anyprecision, adamw_torch_npu_fused),
            missing optim_target_modules/model, malformed optim_args.
        ImportError: the library of the optimizer is not installed (the message names the pip extra).

    Example:
        >>> cls, kwargs = get_optimizer_cls_and_kwargs(TrainingArguments("out", optim="sgd", optim_args="momentum=0.9"))
        >>> cls, kwargs
        (<class 'torch.optim.sgd.SGD'>, {'lr': 5e-05, 'momentum': 0.9})
    """
    name = OptimizerNames(getattr(args.optim, "value", args.optim))
    handler = _HANDLERS.get(name)
    if handler is None:
        raise ValueError(f"Trainer cannot instantiate optim='{name.value}': {SUPPORT[name]['torch'].reason}.")
    entry = SUPPORT[name]["torch"]
    if entry.library and not _library_installed(entry.library):
        check_optimizer(name, "torch")  # raises the ImportError that names the extra
    if getattr(args.optim, "value", None) is None:  # a plain string: see it as the enum member, as handlers do
        args = _Renamed(args, name)
    ctx = _Context(args=args, model=model, kwargs={"lr": args.learning_rate},
                   adam={"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon},
                   optim_args=parse_optim_args(getattr(args, "optim_args", None)))
    return handler(ctx)



# ---------------------------------------------------------------------------------------------- construction checks


def check_optimizer_setup(args, backend: str, device_type: str | None = None, optimizers: tuple = (None, None),
                          optimizer_cls_and_kwargs: tuple | None = None, default_optimizer: bool = True) -> None:
    """The Trainer's construction-time checks of its optimizer and lr scheduler, before anything trains.

    Args:
        args: TrainingArguments.
        backend: the resolved backend name ("torch", "torch_xla", "jax").
        device_type: the torch device type of the run, where the backend knows it.
        optimizers: the Trainer's `optimizers=(optimizer, scheduler)`.
        optimizer_cls_and_kwargs: the Trainer's `optimizer_cls_and_kwargs`.
        default_optimizer: False when a Trainer subclass builds the optimizer itself (create_optimizer or
            get_optimizer_cls_and_kwargs overridden): args.optim is then not checked.

    Raises:
        ValueError: args.optim cannot run on this backend/device (when xtrainer builds the optimizer), a
            metric-driven scheduler that no metric would reach, an optimizer that updates inside backward with
            nan_policy skip/raise.
        TypeError: optimizer_cls_and_kwargs whose kwargs are not a dict.
        ImportError: the library of args.optim is not installed.
    """
    optimizer, scheduler = optimizers
    if optimizer_cls_and_kwargs is not None:
        _, kwargs = optimizer_cls_and_kwargs  # a torch class on jax: refused by the jax backend's prepare
        if not isinstance(kwargs, dict):
            raise TypeError(f"optimizer_cls_and_kwargs must be (class, dict of kwargs); got kwargs {type(kwargs).__name__}.")
    elif optimizer is None and default_optimizer:
        check_optimizer(args.optim, backend, device_type)
        _check_updates_in_backward(args)
        if backend == "jax":  # optim_args optax cannot honour fail now: building the transformation is cheap
            from .backends.jax.optim import build_optimizer

            build_optimizer(args)
    if scheduler is not None and _is_metric_driven_object(scheduler):
        _check_metric_reaches(args, f"the {type(scheduler).__name__} passed in `optimizers`")
    name = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if scheduler is None and name in METRIC_DRIVEN:
        _check_metric_reaches(args, f"lr_scheduler_type='{name}'")


# The scheduler classes transformers steps with the evaluation metric (torch's, transformers', xtrainer's torch one).
_METRIC_DRIVEN_CLASSES = frozenset({"ReduceLROnPlateau", "GreedyLR", "MetricDrivenScheduler"})


def _is_metric_driven_object(scheduler) -> bool:
    return any(cls.__name__ in _METRIC_DRIVEN_CLASSES for cls in type(scheduler).__mro__)


def scheduler_needs_metric(args, lr_scheduler=None) -> bool:
    """Whether the run's lr scheduler is stepped with the evaluation metric (metric_for_best_model).

    Args:
        args: TrainingArguments (lr_scheduler_type, for a scheduler the backend builds).
        lr_scheduler: the scheduler object in use, when there is one (the torch backends'); None on jax.
    """
    if lr_scheduler is not None and not callable(lr_scheduler):  # a torch scheduler object decides for itself
        return _is_metric_driven_object(lr_scheduler)
    return getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) in METRIC_DRIVEN


def _check_metric_reaches(args, what: str) -> None:
    strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
    if strategy == "no":
        raise ValueError(f"{what} is stepped with an evaluation metric, but eval_strategy='no' never evaluates: "
                         "set eval_strategy to 'steps' or 'epoch' (and an eval_dataset).")
    if not args.metric_for_best_model:
        raise ValueError(f"{what} is stepped with an evaluation metric: set metric_for_best_model (e.g. 'loss') to "
                         "name the metric it follows.")


def _check_updates_in_backward(args) -> None:
    name = getattr(args.optim, "value", args.optim)
    in_backward = name in (O.LOMO.value, O.ADALOMO.value) or name.endswith("_layerwise")
    if not in_backward:
        return
    policy = getattr(args, "nan_policy", "ignore")
    if policy not in (None, "ignore"):
        raise ValueError(
            f"optim='{name}' updates the weights inside the backward pass, before the step's loss and gradient norm "
            f"are known, so nan_policy='{policy}' could not skip a non-finite step. Use nan_policy='ignore' or "
            "another optim."
        )
    if name.endswith("_layerwise"):
        if args.gradient_accumulation_steps != 1:
            raise ValueError(f"Layerwise {name} does not support gradient accumulation!")
        if getattr(args, "world_size", 1) > 1:
            raise NotImplementedError(f"Layer-wise {name} does not support distributed (DDP) training")
    if name in (O.LOMO.value, O.ADALOMO.value) and args.gradient_accumulation_steps > 1:
        logger.warning(
            "optim='%s' updates the weights in every backward pass, so gradient_accumulation_steps=%d does not "
            "accumulate: each micro-batch makes its own update (as in transformers).",
            name, args.gradient_accumulation_steps,
        )
