"""Optimizer names -> torch optimizers, with HF's weight-decay grouping.

The two parameter groups (decay first, then no-decay) are built in the same order as transformers'
Trainer, so `optimizer.pt` files are interchangeable with checkpoints written by it.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ...trainer_utils import OptimizerNames

# Parameters whose (lowercased) name matches one of these never get weight decay: biases and
# normalisation weights, as in transformers.
_NO_DECAY_PATTERNS = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]
_NORM_LAYER_TYPES = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that weight decay applies to (not biases, not inside norm layers)."""
    names = []
    for child_name, child in model.named_children():
        for name in decay_parameter_names(child):
            full = f"{child_name}.{name}"
            if isinstance(child, _NORM_LAYER_TYPES) or any(p.search(full.lower()) for p in _NO_DECAY_PATTERNS):
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


def _parse_optim_args(optim_args: str | None) -> dict[str, str]:
    if not optim_args:
        return {}
    pairs = [item.split("=", 1) for item in optim_args.replace(" ", "").split(",") if item]
    bad = [p[0] for p in pairs if len(p) != 2]
    if bad:
        raise ValueError(f"optim_args must look like 'key=value,key=value'; cannot parse {bad}.")
    return dict(pairs)


class Lion(torch.optim.Optimizer):
    """Lion (sign of an interpolated momentum), with decoupled weight decay.

    Update: c = b1*m + (1-b1)*g; p -= lr*(sign(c) + wd*p); m = b2*m + (1-b2)*g.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
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


def get_optimizer_cls_and_kwargs(args, model: nn.Module | None = None) -> tuple[type, dict]:
    """The optimizer class and constructor kwargs (learning rate included) named by `args.optim`.

    transformers' `Trainer.get_optimizer_cls_and_kwargs`: the Trainer builds the optimizer as
    `cls(parameter_groups, **kwargs)`.
    """
    name = OptimizerNames(getattr(args.optim, "value", args.optim))
    extra = _parse_optim_args(getattr(args, "optim_args", None))
    kwargs: dict = {"lr": args.learning_rate}
    adam = {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    if name in (OptimizerNames.ADAMW_TORCH, OptimizerNames.ADAMW):
        return torch.optim.AdamW, {**kwargs, **adam}
    if name is OptimizerNames.ADAMW_TORCH_FUSED:
        return torch.optim.AdamW, {**kwargs, **adam, "fused": True}
    if name is OptimizerNames.SGD:
        kwargs.update({k: float(extra[k]) for k in ("momentum", "dampening") if k in extra})
        if "nesterov" in extra:
            kwargs["nesterov"] = extra["nesterov"].lower() in ("true", "1", "yes")
        return torch.optim.SGD, kwargs
    if name is OptimizerNames.ADAGRAD:
        kwargs.update({k: float(extra[k]) for k in ("lr_decay", "eps") if k in extra})
        return torch.optim.Adagrad, kwargs
    if name is OptimizerNames.RMSPROP:
        kwargs.update({k: float(extra[k]) for k in ("momentum", "alpha", "eps") if k in extra})
        if "centered" in extra:
            kwargs["centered"] = extra["centered"].lower() in ("true", "1", "yes")
        return torch.optim.RMSprop, kwargs
    if name is OptimizerNames.ADAFACTOR:
        try:  # transformers' Adafactor is what HF scripts expect; torch's differs in its defaults
            from transformers.optimization import Adafactor
        except ImportError:
            return torch.optim.Adafactor, kwargs
        return Adafactor, {**kwargs, "scale_parameter": False, "relative_step": False}
    if name in (OptimizerNames.LION, OptimizerNames.LION_SHORT):
        return Lion, {**kwargs, "betas": (args.adam_beta1, args.adam_beta2)}
    raise ValueError(f"optim={name.value!r} has no torch implementation.")


def build_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """The torch optimizer named by `args.optim`, over HF's decay/no-decay groups.

    Args:
        model: the module whose parameters are optimised.
        args: TrainingArguments (optim, learning_rate, adam_*, weight_decay, optim_args).

    Returns:
        A torch.optim.Optimizer.
    """
    optimizer_cls, kwargs = get_optimizer_cls_and_kwargs(args, model)
    return optimizer_cls(parameter_groups(model, args.weight_decay), **kwargs)
