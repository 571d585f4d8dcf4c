"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the torch backend, configured by fsdp / fsdp_config.

Every fsdp_config key of transformers that FSDP2 has an equivalent for acts as accelerate applies it
for transformers' Trainer (see xtrainer/fsdp_options.py for how the arguments are read):

- reshard_after_forward: `fully_shard(reshard_after_forward=...)` (False is fsdp="shard_grad_op").
- hybrid sharding (fsdp="hybrid_shard"): a 2-D device mesh, replicated across nodes and sharded
  within each node (HSDP).
- auto_wrap_policy / transformer_layer_cls_to_wrap / min_num_params: which modules become their own
  FSDP unit (gathered and freed on their own): the layer classes (default: the model's
  `_no_split_modules`), or every module above min_num_params parameters, or none; the root always.
- activation_checkpointing: those units are recomputed in the backward pass (non-reentrant
  checkpoint wrappers, applied before sharding).
- mixed precision: `MixedPrecisionPolicy` from fsdp_config["mixed_precision_policy"] (accelerate's
  key), else from bf16/fp16 as accelerate derives it (parameters, reductions and outputs in that dtype).
- cpu_offload: `CPUOffloadPolicy` (parameters, gradients and optimizer step on the host).
- cpu_ram_efficient_loading: only rank 0 needs real weights; the others may build the model on the
  meta device. Every rank shards an empty model, then rank 0's weights are broadcast into the shards.
- state_dict_type="SHARDED_STATE_DICT": checkpoints hold the model as per-rank shards (torch.distributed
  .checkpoint, in `pytorch_model_fsdp_0/` as transformers names it) instead of gathering full weights on
  rank 0; they load back with any number of processes. save_model() still writes full weights.

FSDP1-only keys (backward_prefetch, limit_all_gathers, ...) and torch_xla's FSDP keys have no FSDP2
meaning: each is named in one warning.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

from ...fsdp_options import FSDP1_KEYS, KNOWN_KEYS, SHARDING_OPTIONS, XLA_FSDP_KEYS, FsdpOptions

logger = logging.getLogger(__name__)

SHARDED_MODEL_DIR = "pytorch_model_fsdp_0"  # transformers' directory for a SHARDED_STATE_DICT model
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def _fsdp2():
    try:
        from torch.distributed import fsdp
    except ImportError:  # pragma: no cover
        fsdp = None
    if fsdp is None or not hasattr(fsdp, "fully_shard"):  # torch < 2.6 keeps FSDP2 under _composable
        from torch.distributed._composable import fsdp
    return fsdp


def options(args) -> FsdpOptions:
    return FsdpOptions.from_args(args)


def warn_unsupported(opts: FsdpOptions) -> None:
    """One warning for each key FSDP2 has no equivalent for."""
    for key in sorted(opts.given):
        reason = None
        if key in FSDP1_KEYS:
            reason = "it configures FSDP1's wrapper; FSDP2 (used here) always uses the original parameters, " \
                     "prefetches the next unit's all-gather itself and needs no rate limit"
        elif key in XLA_FSDP_KEYS and key != "xla_fsdp_grad_ckpt":
            reason = "it configures torch_xla's FSDP wrapper; use backend='torch_xla' (sharded over its mesh by fsdp=True)"
        elif key == "xla_fsdp_grad_ckpt":
            reason = "it belongs to torch_xla's FSDP wrapper; use fsdp_config['activation_checkpointing']"
        elif key == "version" and opts.version != 2:
            reason = "FSDP1 is not available; xtrainer shards with FSDP2"
        elif key == "min_num_params" and opts.min_num_params and opts.auto_wrap_policy != "SIZE_BASED_WRAP":
            reason = f"it only applies with auto_wrap_policy='SIZE_BASED_WRAP' (the policy is {opts.auto_wrap_policy!r})"
        elif key not in KNOWN_KEYS and key not in SHARDING_OPTIONS + ("offload", "auto_wrap"):
            reason = "it is not an fsdp_config key of transformers"
        if reason:
            logger.warning("fsdp_config[%r] has no effect on backend='torch': %s.", key, reason)


def _mesh(opts: FsdpOptions, world_size: int, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    # An explicit mesh of the backend's device: fully_shard's default picks CUDA whenever it
    # exists, even when the run asked for use_cpu.
    if not opts.hybrid:
        return init_device_mesh(device.type, (world_size,))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if world_size % per_node:
        raise ValueError(f"hybrid sharding needs the same number of processes on every node; {world_size} processes "
                         f"do not split into nodes of LOCAL_WORLD_SIZE={per_node}.")
    return init_device_mesh(device.type, (world_size // per_node, per_node), mesh_dim_names=("replicate", "shard"))


def _mixed_precision(opts: FsdpOptions, args):
    policy_cls = _fsdp2().MixedPrecisionPolicy
    spec = opts.mixed_precision_policy
    if spec is None:
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        # accelerate's FSDP2 policy for Trainer(bf16/fp16=True): gathers, compute, reductions and outputs in it.
        return policy_cls() if dtype is None else policy_cls(param_dtype=dtype, reduce_dtype=dtype, output_dtype=dtype)
    if isinstance(spec, str):
        dtype = _dtype(spec, "mixed_precision_policy")
        return policy_cls(param_dtype=dtype, reduce_dtype=dtype, output_dtype=dtype)
    if not isinstance(spec, dict):
        raise ValueError(f"fsdp_config['mixed_precision_policy'] must be a dtype name or a dict, got {spec!r}.")
    allowed = {"param_dtype", "reduce_dtype", "output_dtype"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"fsdp_config['mixed_precision_policy'] has unknown keys {unknown}; allowed: {sorted(allowed)}.")
    return policy_cls(**{k: _dtype(v, f"mixed_precision_policy.{k}") for k, v in spec.items() if v is not None})


def _dtype(name, key: str) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtype = _DTYPES.get(str(name).lower().removeprefix("torch."))
    if dtype is None:
        raise ValueError(f"fsdp_config[{key!r}]={name!r} is not a dtype; use one of {sorted(_DTYPES)}.")
    return dtype


def _offload(opts: FsdpOptions, device: torch.device):
    if not opts.cpu_offload:
        return None
    if device.type == "cpu":
        logger.warning("fsdp_config['cpu_offload'] has no effect on a CPU run: the parameters are in host memory already.")
        return None
    return _fsdp2().CPUOffloadPolicy(pin_memory=True)


def _tied_outside(module: nn.Module, prefix: str, names_by_param: dict[int, list[str]]) -> bool:
    """Whether `module` holds a parameter that is also reached under a name outside it (a tied weight):
    FSDP2 refuses a parameter shared by two units."""
    inside = prefix + "."
    for param in module.parameters():
        names = names_by_param.get(id(param), [])
        if len(names) > 1 and any(not n.startswith(inside) for n in names):
            return True
    return False


def wrap_units(model: nn.Module, opts: FsdpOptions) -> list[nn.Module]:
    """The modules that become their own FSDP unit, innermost first (the root is not among them).

    Raises:
        ValueError: a class in transformer_layer_cls_to_wrap that the model does not contain.
    """
    named = [(name, m) for name, m in model.named_modules() if m is not model]
    if opts.auto_wrap_policy == "NO_WRAP":
        return []
    if opts.auto_wrap_policy == "SIZE_BASED_WRAP":
        names_by_param: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names_by_param.setdefault(id(param), []).append(name)
        # Containers without a forward (ModuleList/ModuleDict) cannot be units: they never run as one.
        units = [(name, m) for name, m in named
                 if not isinstance(m, (nn.ModuleList, nn.ModuleDict))
                 and sum(p.numel() for p in m.parameters()) > opts.min_num_params
                 and not _tied_outside(m, name, names_by_param)]
        return [m for _, m in sorted(units, key=lambda item: -item[0].count("."))]
    classes = set(opts.transformer_layer_cls_to_wrap or getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for _, m in named}
    missing = sorted(classes - present) if opts.transformer_layer_cls_to_wrap else []
    if missing:
        raise ValueError(
            f"fsdp_config['transformer_layer_cls_to_wrap'] names {missing}, which {type(model).__name__} does not "
            f"contain; its module classes include {sorted(present)[:12]}."
        )
    return [m for _, m in named if type(m).__name__ in classes]


def _checkpoint(model: nn.Module, units: list[nn.Module]) -> list[nn.Module]:
    """Wraps each unit for activation checkpointing (non-reentrant, as accelerate); returns the wrappers."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    targets = {id(u) for u in units}
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: id(m) in targets,
    )
    wrapped = [m for m in model.modules() if id(getattr(m, "_checkpoint_wrapped_module", None)) in targets]
    return wrapped


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            buf = module._buffers.get(name)
            if buf is not None:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def _to_meta(model: nn.Module) -> None:
    """Moves the model to the meta device, keeping tied parameters tied (`Module.to` across devices
    gives each module a new Parameter, which would make rank 0's model differ from the others')."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    model.to(torch.device("meta"))
    for names in groups.values():
        shared = model.get_parameter(names[0])
        for name in names[1:]:
            module_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module_name) if module_name else model, leaf, shared)


def is_on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def shard(model: nn.Module, args, world_size: int, rank: int, device: torch.device) -> nn.Module:
    """Applies FSDP2 to `model` in place as fsdp_config asks (see the module docstring); returns it."""
    fsdp = _fsdp2()
    if isinstance(model, fsdp.FSDPModule):  # a second train() on the same Trainer: already sharded
        return model
    opts = options(args)
    warn_unsupported(opts)
    if opts.activation_checkpointing and getattr(args, "activation_checkpointing", False):
        raise ValueError(
            "fsdp_config['activation_checkpointing'] and activation_checkpointing (gradient_checkpointing) are both "
            "set; keep the fsdp_config one (the other adds an all-gather to every backward pass)."
        )
    kwargs = {"mesh": _mesh(opts, world_size, device), "reshard_after_forward": opts.reshard_after_forward,
              "mp_policy": _mixed_precision(opts, args)}
    offload = _offload(opts, device)
    if offload is not None:
        kwargs["offload_policy"] = offload
    full_state, buffers = None, None
    if opts.cpu_ram_efficient_loading:
        # Rank 0's weights are the run's: keep them, and shard an empty (meta) model on every rank.
        full_state = model.state_dict() if rank == 0 else {}
        buffers = {k: v.detach().clone() for k, v in _non_persistent_buffers(model).items()} if rank == 0 else {}
        _to_meta(model)
    elif is_on_meta(model):
        raise ValueError(
            "The model is on the meta device (no weights) on this process: set fsdp_config['cpu_ram_efficient_loading']"
            "=True to receive rank 0's weights, or build the model with weights on every process."
        )
    units = wrap_units(model, opts)
    if opts.activation_checkpointing:
        units = _checkpoint(model, units)
    for unit in units:
        fsdp.fully_shard(unit, **kwargs)
    fsdp.fully_shard(model, **kwargs)
    if full_state is not None:
        _load_from_rank0(model, full_state, buffers, device)
    return model


def _load_from_rank0(model: nn.Module, full_state: dict, buffers: dict, device: torch.device) -> None:
    """Allocates the meta shards and fills them (and the non-persistent buffers) with rank 0's values."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    set_model_state_dict(model, full_state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))
    for fqn, local in _non_persistent_buffers(model).items():
        value = buffers[fqn].to(device) if fqn in buffers else local
        dist.broadcast(value, src=0)
        module_name, _, name = fqn.rpartition(".")
        owner = model.get_submodule(module_name) if module_name else model
        owner._buffers[name] = value
    if hasattr(model, "tie_weights"):
        model.tie_weights()


# ------------------------------------------------------------------ SHARDED_STATE_DICT checkpoints


def save_sharded_model(model: nn.Module, directory: str, is_main: bool) -> None:
    """Every rank writes its shards of the model into `directory/pytorch_model_fsdp_0` (collective);
    rank 0 adds the model's config.json (transformers models), so the checkpoint says what it holds."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=os.path.join(directory, SHARDED_MODEL_DIR))
    config = getattr(model, "config", None)
    if is_main and hasattr(config, "save_pretrained"):
        config.save_pretrained(directory)


def has_sharded_model(directory: str) -> bool:
    return os.path.isdir(os.path.join(directory, SHARDED_MODEL_DIR))


def load_sharded_model(model: nn.Module, directory: str, distributed: bool) -> None:
    """Reads `pytorch_model_fsdp_0` into the model, sharded or not, whatever the number of processes that wrote it."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    holder = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(holder, checkpoint_id=os.path.join(directory, SHARDED_MODEL_DIR), no_dist=not distributed)
    set_model_state_dict(model, holder["model"])
