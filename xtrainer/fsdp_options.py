"""TrainingArguments.fsdp / fsdp_config, read once into one typed record that every backend interprets.

transformers 5.x turns FSDP on with `fsdp=True` and configures it through `fsdp_config`; the older
string form (`fsdp="full_shard auto_wrap offload"`) still works and maps onto the same keys:
"full_shard" -> reshard_after_forward=True, "shard_grad_op" -> reshard_after_forward=False,
"hybrid_shard" / "hybrid_shard_zero2" -> the same, sharded within a host and replicated across hosts,
"offload" -> cpu_offload, "auto_wrap" -> the default wrap policy, "no_shard" -> plain data parallelism.
Keys may carry transformers' legacy "fsdp_" prefix; boolean values may be strings ("true").

How each backend acts on the record: torch/distributed.py + torch/fsdp.py (FSDP2), and the mesh
mapping below for the SPMD backends (jax, torch_xla).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

SHARDING_OPTIONS = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard")
WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
STATE_DICT_TYPES = ("FULL_STATE_DICT", "SHARDED_STATE_DICT")
#: Keys of transformers' FSDP1 (fsdp_config["version"] = 1), which FSDP2 has no equivalent for.
FSDP1_KEYS = ("backward_prefetch", "forward_prefetch", "limit_all_gathers", "use_orig_params", "sync_module_states")
#: Keys of torch_xla's own FSDP wrapper (transformers' `xla` path).
XLA_FSDP_KEYS = ("xla", "xla_fsdp_v2", "xla_fsdp_settings", "xla_fsdp_grad_ckpt")
#: Keys FsdpOptions reads into its fields.
CORE_KEYS = (
    "version", "reshard_after_forward", "cpu_offload", "activation_checkpointing", "cpu_ram_efficient_loading",
    "state_dict_type", "auto_wrap_policy", "transformer_layer_cls_to_wrap", "min_num_params", "mixed_precision_policy",
)
KNOWN_KEYS = CORE_KEYS + FSDP1_KEYS + XLA_FSDP_KEYS


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "t", "yes", "y", "on"):
        return True
    if text in ("0", "false", "f", "no", "n", "off"):
        return False
    raise ValueError(f"fsdp_config[{key!r}] must be a boolean, got {value!r}.")


@dataclass(frozen=True)
class FsdpOptions:
    """What `fsdp` and `fsdp_config` ask for (`enabled` False: neither was set)."""

    enabled: bool = False
    shard: bool = True  # False for "no_shard": data parallelism only
    reshard_after_forward: bool = True
    hybrid: bool = False  # shard within a host, replicate across hosts
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    cpu_ram_efficient_loading: bool = False
    state_dict_type: str = "FULL_STATE_DICT"
    auto_wrap_policy: str = "TRANSFORMER_BASED_WRAP"
    transformer_layer_cls_to_wrap: tuple[str, ...] | None = None
    min_num_params: int = 0
    mixed_precision_policy: Any = None  # accelerate's key: "bf16"/"fp16"/"fp32" or {param_dtype, reduce_dtype, output_dtype}
    version: int = 2
    given: frozenset = field(default_factory=frozenset)  # the keys the user set (legacy options included)
    other: dict = field(default_factory=dict)  # FSDP1 / torch_xla-FSDP / unknown keys and their values

    @classmethod
    def from_args(cls, args) -> FsdpOptions:
        """Reads args.fsdp and args.fsdp_config (a dict, its JSON, or a JSON file path).

        Raises:
            ValueError: an unknown `fsdp` option, or a value of the wrong kind.
        """
        config = _read_config(getattr(args, "fsdp_config", None))
        options = _legacy_options(getattr(args, "fsdp", None))
        if not options and not _enabled(getattr(args, "fsdp", None)):
            return cls()
        settings: dict[str, Any] = {"enabled": True}
        given: set[str] = set(config)
        for option in options:
            if option == "offload":
                config.setdefault("cpu_offload", True)
            elif option in ("shard_grad_op", "hybrid_shard_zero2"):
                config.setdefault("reshard_after_forward", False)
            elif option == "no_shard":
                settings["shard"] = False
            if option.startswith("hybrid_shard"):
                settings["hybrid"] = True
            given.add(option)
        for key in ("reshard_after_forward", "cpu_offload", "activation_checkpointing", "cpu_ram_efficient_loading"):
            if key in config:
                settings[key] = _to_bool(config[key], key)
        if "state_dict_type" in config:
            settings["state_dict_type"] = _choice(config["state_dict_type"], STATE_DICT_TYPES, "state_dict_type")
        names = config.get("transformer_layer_cls_to_wrap")
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        if names is not None:
            settings["transformer_layer_cls_to_wrap"] = tuple(names)
        if "min_num_params" in config:
            settings["min_num_params"] = int(config["min_num_params"])
        if "auto_wrap_policy" in config:
            settings["auto_wrap_policy"] = _choice(config["auto_wrap_policy"], WRAP_POLICIES, "auto_wrap_policy")
        elif settings.get("min_num_params", 0) > 0 and not names:
            # A threshold alone means size-based wrapping (transformers 4.x); 5.x would ignore it.
            settings["auto_wrap_policy"] = "SIZE_BASED_WRAP"
        if "mixed_precision_policy" in config:
            settings["mixed_precision_policy"] = config["mixed_precision_policy"]
        if "version" in config:
            settings["version"] = int(config["version"])
        settings["other"] = {k: v for k, v in config.items() if k not in CORE_KEYS}
        settings["given"] = frozenset(given)
        return cls(**settings)

    @property
    def sharded_state_dict(self) -> bool:
        return self.enabled and self.state_dict_type == "SHARDED_STATE_DICT"


def _enabled(fsdp) -> bool:
    if isinstance(fsdp, str):
        return fsdp.strip().lower() not in ("", "false", "none", "0")
    return bool(fsdp)


def _legacy_options(fsdp) -> list[str]:
    if fsdp is None or isinstance(fsdp, bool):
        return []
    if isinstance(fsdp, str):
        items = fsdp.split()
        if [i.lower() for i in items] in (["true"], ["false"], ["1"], ["0"]):
            return []
    else:
        items = [str(getattr(f, "value", f)) for f in fsdp]
    known = SHARDING_OPTIONS + ("offload", "auto_wrap")
    unknown = [i for i in items if i.lower() not in known]
    if unknown:
        raise ValueError(f"Unknown `fsdp` option(s) {unknown}; the options are {list(known)} (or fsdp=True).")
    return [i.lower() for i in items]


def _read_config(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, str):
        text = config.strip()
        if not text.startswith("{"):
            if not os.path.isfile(text):
                raise ValueError(f"fsdp_config={config!r} is neither a dict, a JSON object nor a JSON file.")
            with open(text, encoding="utf-8") as f:
                text = f.read()
        config = json.loads(text)
    if not isinstance(config, dict):
        raise ValueError(f"fsdp_config must be a dict (or its JSON), got {type(config).__name__}.")
    return {(k[5:] if k.startswith("fsdp_") else k): v for k, v in config.items()}


def _choice(value, allowed: tuple[str, ...], key: str) -> str:
    text = str(value).upper()
    if text not in allowed:
        raise ValueError(f"fsdp_config[{key!r}] must be one of {list(allowed)}, got {value!r}.")
    return text


# ------------------------------------------------------------------ SPMD backends (jax, torch_xla)

#: fsdp_config keys that XLA's SPMD partitioner decides by itself, with what to use instead.
_SPMD_NO_MEANING = {
    "reshard_after_forward": "XLA's scheduler decides whether gathered parameters stay alive between forward "
                             "and backward; activation_checkpointing trades memory for compute",
    "transformer_layer_cls_to_wrap": "every parameter is sharded on its own; there are no wrapped units",
    "auto_wrap_policy": "every parameter is sharded on its own; use min_num_params to keep small ones replicated",
    "cpu_offload": "parameters stay in device memory; use a larger fsdp axis (mesh), activation_checkpointing or "
                   "a smaller per_device_train_batch_size",
    "cpu_ram_efficient_loading": "each process builds the model on its host and keeps only its own shards on the "
                                 "devices",
    "state_dict_type": "checkpoints are always sharded (each process writes its own shards) and save_model() "
                       "writes full weights",
    "mixed_precision_policy": "use bf16=True (or fp16=True): the step casts parameters to that dtype",
    "version": "the SPMD partitioner has no FSDP versions",
}


@dataclass(frozen=True)
class SpmdFsdpPlan:
    """fsdp / fsdp_config on a (data, fsdp, tensor) mesh: the mesh sizes and the replication threshold."""

    mesh: Any  # args.mesh value to resolve: a {axis: size} dict, or None for the default data axis
    min_num_params: int = 0  # parameters with fewer elements stay replicated
    activation_checkpointing: bool = False


def spmd_fsdp_plan(args, mesh, num_processes: int, backend: str) -> SpmdFsdpPlan:
    """Maps fsdp/fsdp_config onto the mesh of an SPMD backend; warns once for each key that has no meaning.

    full_shard / shard_grad_op / fsdp=True: an fsdp axis over all devices. hybrid_shard(_zero2): the
    data axis over the processes (hosts) and the fsdp axis over each host's devices. no_shard: the data
    axis only. An explicit `mesh` wins, but must have an fsdp axis when sharding is asked for.

    Raises:
        ValueError: fsdp asks for sharding but `mesh` gives the fsdp axis size 1.
    """
    options = FsdpOptions.from_args(args)
    if not options.enabled:
        return SpmdFsdpPlan(mesh=mesh)
    if mesh is not None:
        sizes = json.loads(mesh) if isinstance(mesh, str) else dict(mesh)
        if options.shard and sizes.get("fsdp", 1) == 1:
            raise ValueError(
                f"fsdp={args.fsdp!r} asks for sharded parameters, but mesh={sizes} has no fsdp axis: drop `fsdp` and "
                "keep the mesh, or give the mesh an fsdp axis (e.g. {'fsdp': -1})."
            )
    elif not options.shard:
        mesh = {"data": -1}
    elif options.hybrid:
        mesh = {"data": num_processes, "fsdp": -1}
    else:
        mesh = {"fsdp": -1}
    for key in sorted(options.given):
        reason = _SPMD_NO_MEANING.get(key)
        if key == "reshard_after_forward" and options.reshard_after_forward:
            reason = None  # the default behaviour, nothing to warn about
        if key in FSDP1_KEYS:
            reason = "it configures FSDP1's wrapper; the SPMD partitioner schedules parameter gathers itself"
        if key in XLA_FSDP_KEYS:
            reason = "it configures torch_xla's FSDP wrapper; this backend shards over the mesh instead"
        if key == "offload":
            reason = _SPMD_NO_MEANING["cpu_offload"]
        if key in ("shard_grad_op", "hybrid_shard_zero2"):
            logger.warning(
                "fsdp=%r on backend=%r shards the parameters as %s does; keeping them gathered from forward to "
                "backward (reshard_after_forward=False) has no effect: %s.", key, backend,
                "hybrid_shard" if key.startswith("hybrid") else "full_shard", _SPMD_NO_MEANING["reshard_after_forward"],
            )
            continue
        if key not in KNOWN_KEYS and key not in SHARDING_OPTIONS + ("offload", "auto_wrap"):
            reason = "it is not an fsdp_config key of transformers"
        if reason:
            what = f"fsdp={key!r}" if key in SHARDING_OPTIONS + ("offload",) else f"fsdp_config[{key!r}]"
            logger.warning("%s has no effect on backend=%r: %s.", what, backend, reason)
    return SpmdFsdpPlan(mesh=mesh, min_num_params=options.min_num_params,
                        activation_checkpointing=options.activation_checkpointing)
