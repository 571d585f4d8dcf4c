"""The torch optimizer of a run: transformers' class + kwargs (xtrainer/optimizers.py), instantiated as its
Trainer.create_optimizer does, and the per-step duties some optimizers have.

The two parameter groups (decay first, then no-decay) are built in the same order as transformers'
Trainer, so `optimizer.pt` files are interchangeable with checkpoints written by it. Some optimizers
bring their own groups or arguments (GaLore/APOLLO `params`, LOMO's `model`, the layer-wise
`optimizer_dict`), and some need the train step's help: LOMO's update happens inside its own backward
(`backward`), schedule-free optimizers switch the weights between training and evaluation
(`train_mode` / `eval_mode`).
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from ...optimizers import get_optimizer_cls_and_kwargs
from ...trainer_utils import OptimizerNames

logger = logging.getLogger(__name__)

# Parameters whose (lowercased) name matches one of these never get weight decay: biases and
# normalisation weights, as in transformers (which also skips everything inside an nn.LayerNorm).
_NO_DECAY_PATTERNS = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]
_NO_DECAY_LAYER_TYPES = (nn.LayerNorm,)

# transformers builds these without the run's weight_decay: say so once rather than ignore it silently.
_NO_WEIGHT_DECAY = {
    "galore": "GaLore's parameter groups", "apollo": "APOLLO's parameter groups", "lomo": "LOMO", "adalomo": "AdaLomo",
}


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that weight decay applies to: transformers' `Trainer.get_decay_parameter_names`.

    Not biases, not normalisation weights (by name), nothing inside an nn.LayerNorm.
    """
    names = []
    for child_name, child in model.named_children():
        for name in decay_parameter_names(child):
            full = f"{child_name}.{name}"
            if isinstance(child, _NO_DECAY_LAYER_TYPES) or any(p.search(full.lower()) for p in _NO_DECAY_PATTERNS):
                continue
            names.append(full)
    names += [k for k in model._parameters if not any(p.search(k.lower()) for p in _NO_DECAY_PATTERNS)]
    return names


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decay group, no-decay group] of the trainable parameters."""
    decay = set(decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


class Lion(torch.optim.Optimizer):
    """Lion (sign of an interpolated momentum), with decoupled weight decay, in plain torch ops.

    The update of bitsandbytes' 32-bit Lion, for devices its kernels do not run on (torch_xla):
    c = b1*m + (1-b1)*g; p -= lr*(sign(c) + wd*p); m = b2*m + (1-b2)*g.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, **_bitsandbytes_only):
        if lr <= 0:
            raise ValueError(f"Lion needs a positive learning rate, got {lr}.")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                update = m.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def _is_optimizer_class(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)


def _adapt_to_device(cls, kwargs: dict, device_type: str):
    """What transformers' choice becomes where its kernels cannot run: the same update in plain ops."""
    kwargs = dict(kwargs)
    if cls.__module__.startswith("optimi") and device_type != "cuda":
        # optimi picks its Triton kernels whenever triton is importable, even for CPU tensors, and then fails.
        kwargs.setdefault("triton", False)
    if device_type != "xla":
        return cls, kwargs
    if kwargs.get("fused"):  # torch's fused kernels have no XLA version; XLA fuses the plain update itself
        kwargs["fused"] = False
    if cls.__module__.startswith("bitsandbytes") and cls.__name__ == "Lion" and kwargs.get("optim_bits") == 32:
        cls = Lion
    if cls.__module__.startswith("optimi"):
        kwargs.setdefault("foreach", True)
    return cls, kwargs


def build_optimizer(model: nn.Module, args, optimizer_cls_and_kwargs=None, device_type: str = "cpu", groups=None):
    """The torch optimizer of a run, as transformers' `Trainer.create_optimizer` builds it.

    Args:
        model: the (unwrapped or DDP/FSDP-wrapped) module whose parameters are optimised.
        args: TrainingArguments (optim, optim_args, learning_rate, adam_*, weight_decay, optim_target_modules).
        optimizer_cls_and_kwargs: the Trainer's `optimizer_cls_and_kwargs=(cls, kwargs)`; None uses
            `get_optimizer_cls_and_kwargs(args, model)`. A `cls` that is not an Optimizer subclass is a factory:
            `cls()(model, **kwargs)` builds the optimizer (transformers' rule).
        device_type: where the optimizer runs; kernels that cannot run there give way to the same update in
            plain ops (on xla: fused AdamW -> AdamW, bitsandbytes' 32-bit Lion -> xtrainer's Lion; off cuda:
            StableAdamW without Triton).
        groups: the parameter groups (default: `parameter_groups(model, args.weight_decay)`); the Trainer passes
            the ones its (overridable) get_decay_parameter_names gives.

    Returns:
        A torch.optim.Optimizer over transformers' decay/no-decay groups, unless the kwargs bring their own
        `params` (GaLore, APOLLO), `model` (LOMO) or `optimizer_dict` (layer-wise variants).
    """
    if optimizer_cls_and_kwargs is not None:
        cls, kwargs = optimizer_cls_and_kwargs
    else:
        cls, kwargs = get_optimizer_cls_and_kwargs(args, model)
        warn_dropped_weight_decay(args)
    kwargs = dict(kwargs)
    if not _is_optimizer_class(cls):
        return cls()(model, **kwargs)
    cls, kwargs = _adapt_to_device(cls, kwargs, device_type)
    groups = parameter_groups(model, args.weight_decay) if groups is None else groups
    for own in ("params", "model", "optimizer_dict"):  # later keys win, as in transformers
        if own in kwargs:
            groups = kwargs.pop(own)
    optimizer = cls(groups, **kwargs)
    if cls.__module__.startswith("bitsandbytes") and kwargs.get("optim_bits") == 8:
        _embeddings_in_32_bit(model)
    return optimizer


def warn_dropped_weight_decay(args) -> None:
    """Says once that weight_decay does nothing for the optim values transformers builds without it."""
    name = getattr(args.optim, "value", args.optim)
    if not args.weight_decay:
        return
    for prefix, what in _NO_WEIGHT_DECAY.items():
        if name.startswith(prefix):
            logger.warning(
                "weight_decay=%s is not applied by optim='%s': transformers builds %s without it, and so does "
                "xtrainer. Pass weight_decay through optim_args where the optimizer takes it, or use another optim.",
                args.weight_decay, name, what,
            )
            return


def _embeddings_in_32_bit(model: nn.Module) -> None:
    """bitsandbytes 8-bit optimizers keep embedding states in 32 bits (transformers does the same)."""
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})


# ------------------------------------------------------------------ per-step duties of some optimizers


def is_lomo(optimizer) -> bool:
    """Whether the optimizer updates the weights inside its own backward (LOMO, AdaLomo)."""
    return hasattr(optimizer, "fused_backward") and type(optimizer).__module__.startswith("lomo_optim")


def backward(loss: torch.Tensor, optimizer, learning_rate: float, scaler=None) -> None:
    """loss.backward(), or LOMO's fused backward that also applies the update at `learning_rate`."""
    if is_lomo(optimizer):
        optimizer.fused_backward(loss, learning_rate)
    elif scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()


def train_mode(optimizer) -> None:
    """Schedule-free optimizers: use the training weights (transformers calls this in each training step)."""
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()


def eval_mode(optimizer) -> None:
    """Schedule-free optimizers: use the averaged weights (transformers calls this before evaluating)."""
    if callable(getattr(optimizer, "eval", None)):
        optimizer.eval()


def is_layerwise(optimizer) -> bool:
    """Whether each parameter is updated by its own optimizer inside backward (GaLore/APOLLO `*_layerwise`)."""
    return getattr(optimizer, "optimizer_dict", None) is not None


def uses_lomo_or_layerwise(args) -> bool:
    name = getattr(args.optim, "value", args.optim)
    return name in (OptimizerNames.LOMO.value, OptimizerNames.ADALOMO.value) or name.endswith("_layerwise")
