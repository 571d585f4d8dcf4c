"""Weight interchange between the NNX reference models and transformers checkpoints.

Owns: the name/layout mapping between HF torch state dicts and `LlamaForCausalLM` /
`BertForSequenceClassification` / `T5ForConditionalGeneration` (its mapping lives in `t5_interop`)
parameters, loading from a state dict (torch tensors or arrays) or a `save_pretrained` directory
(config.json + model.safetensors, sharded index included), and exporting to a directory that
`transformers.<Arch>.from_pretrained` loads.

Layout rules: torch Linear weights are (out, in); our kernels are in_shape + out_shape with an
explicit heads axis (e.g. q: (embed, heads, head_dim)), so import is `w.T.reshape(kernel.shape)` and
export its inverse. HF flattens heads as (heads, head_dim) row-major, which this reshape matches.
Tied Llama embeddings have no lm_head parameter; export omits `lm_head.weight` like HF does.
Reading safetensors needs no torch; exporting config.json needs transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._nn import get_value, set_value
from .bert import BertConfig, BertForSequenceClassification
from .llama import LlamaConfig, LlamaForCausalLM
from .t5 import T5Config, T5ForConditionalGeneration
from .t5_interop import T5_IGNORED_SUFFIXES, t5_mapping

# Buffers and heads a checkpoint may carry that these models do not use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids", "embeddings.token_type_ids",
                     *T5_IGNORED_SUFFIXES)
_IGNORED_PREFIXES = ("cls.",)  # BertForPreTraining's MLM/NSP heads when fine-tuning from a base checkpoint


def _llama_mapping(cfg: LlamaConfig):
    """(hf_name, path in the NNX model, n_in) triples; n_in > 0 marks a Linear weight with n_in input axes."""
    m = [("model.embed_tokens.weight", ("model", "embed_tokens", "embedding"), 0),
         ("model.norm.weight", ("model", "norm", "scale"), 0)]
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"model.layers.{i}.", ("model", "layers", i)
        for proj, n_in in (("q_proj", 1), ("k_proj", 1), ("v_proj", 1), ("o_proj", 2)):
            m.append((f"{hf}self_attn.{proj}.weight", ours + ("self_attn", proj, "kernel"), n_in))
            if cfg.attention_bias:
                m.append((f"{hf}self_attn.{proj}.bias", ours + ("self_attn", proj, "bias"), 0))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            m.append((f"{hf}mlp.{proj}.weight", ours + ("mlp", proj, "kernel"), 1))
            if cfg.mlp_bias:
                m.append((f"{hf}mlp.{proj}.bias", ours + ("mlp", proj, "bias"), 0))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            m.append((f"{hf}{norm}.weight", ours + (norm, "scale"), 0))
    if not cfg.tie_word_embeddings:
        m.append(("lm_head.weight", ("lm_head", "kernel"), 1))
    return m


def _bert_mapping(cfg: BertConfig):
    def dense(hf, ours, n_in=1):
        return [(f"{hf}.weight", ours + ("kernel",), n_in), (f"{hf}.bias", ours + ("bias",), 0)]

    def norm(hf, ours):
        return [(f"{hf}.weight", ours + ("scale",), 0), (f"{hf}.bias", ours + ("bias",), 0)]

    emb = ("bert", "embeddings")
    m = [(f"bert.embeddings.{n}.weight", emb + (n, "embedding"), 0)
         for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    m += norm("bert.embeddings.LayerNorm", emb + ("LayerNorm",))
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"bert.encoder.layer.{i}.", ("bert", "layer", i)
        for n in ("query", "key", "value"):
            m += dense(f"{hf}attention.self.{n}", ours + ("attention", n))
        m += dense(f"{hf}attention.output.dense", ours + ("attention", "output"), n_in=2)
        m += norm(f"{hf}attention.output.LayerNorm", ours + ("attention", "LayerNorm"))
        m += dense(f"{hf}intermediate.dense", ours + ("intermediate",))
        m += dense(f"{hf}output.dense", ours + ("output",))
        m += norm(f"{hf}output.LayerNorm", ours + ("LayerNorm",))
    m += dense("bert.pooler.dense", ("bert", "pooler"))
    m += dense("classifier", ("classifier",))
    return m


_ARCHS = {
    "LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM, _llama_mapping, "model."),
    "BertForSequenceClassification": (BertConfig, BertForSequenceClassification, _bert_mapping, "bert."),
    "T5ForConditionalGeneration": (T5Config, T5ForConditionalGeneration, t5_mapping, "shared."),
}


def _arch_of(model_or_cls) -> str:
    cls = model_or_cls if isinstance(model_or_cls, type) else type(model_or_cls)
    for name, (_, model_cls, _, _) in _ARCHS.items():
        if issubclass(cls, model_cls):
            return name
    raise TypeError(f"no HF mapping for {cls.__name__}; supported: {', '.join(_ARCHS)}")


def _variable(model, path):
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def _to_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # torch tensor; torch cannot hand bfloat16 to numpy, so widen those first
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(t)  # numpy, or a (fully addressable) jax array


def _normalise_keys(state: Mapping[str, Any], base_prefix: str) -> dict[str, Any]:
    state = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
             for k, v in state.items()}
    # A bare base-model checkpoint (LlamaModel / BertModel) lacks the "model." / "bert." prefix.
    if not any(k.startswith(base_prefix) for k in state):
        state = {(k if k.startswith(("lm_head.", "classifier.", "cls.")) else base_prefix + k): v
                 for k, v in state.items()}
    return state


def read_safetensors_dir(directory: str) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors (or the shards listed in model.safetensors.index.json), on host."""
    from safetensors.numpy import load_file

    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return dict(load_file(single))
    index = single + ".index.json"
    if not os.path.exists(index):
        raise FileNotFoundError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out: dict[str, np.ndarray] = {}
    for name in files:
        out.update(load_file(os.path.join(directory, name)))
    return out


def _copy_in(model: nnx.Module, state_dict: Mapping[str, Any]) -> tuple[str, list[tuple], list[str]]:
    """Copy what `state_dict` has into `model`; returns (arch, [(missing key, path)], unexpected keys)."""
    arch = _arch_of(model)
    _, _, mapping_fn, prefix = _ARCHS[arch]
    state = _normalise_keys(state_dict, prefix)
    used, missing = set(), []
    for hf_name, path, n_in in mapping_fn(model.config):
        if hf_name not in state:
            missing.append((hf_name, path))
            continue
        used.add(hf_name)
        var = _variable(model, path)
        current = get_value(var)
        # Layout work happens in numpy: eager jax transposes would compile once per weight shape.
        arr = _to_numpy(state[hf_name])
        if n_in:
            arr = arr.T
        if arr.size != math.prod(current.shape):
            raise ValueError(f"{hf_name}: checkpoint shape {arr.shape} does not fit parameter shape {current.shape}")
        set_value(var, jnp.asarray(arr.reshape(current.shape).astype(np.dtype(current.dtype))))
    # HF's torch state_dict() lists a tied lm_head.weight even though it is the embedding.
    tied_ok = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    unexpected = [k for k in state if k not in used and k not in tied_ok
                  and not k.endswith(_IGNORED_SUFFIXES) and not k.startswith(_IGNORED_PREFIXES)]
    return arch, missing, unexpected


def _report(arch: str, missing: list[tuple], unexpected: list[str], strict: bool) -> None:
    missing = [name for name, _ in missing]
    if missing or unexpected:
        msg = f"{arch}: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}; unexpected keys {unexpected[:8]}"
        if strict:
            raise KeyError(msg)
        warnings.warn(msg + " (missing ones keep their initial values)", stacklevel=3)


def load_hf_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], *, strict: bool = True) -> nnx.Module:
    """Copy HF-named weights into `model` in place (cast to each parameter's dtype) and return it.

    strict=True raises on missing or unexpected keys; strict=False warns and keeps the model's own
    values for missing ones (e.g. a fresh classifier when fine-tuning a base checkpoint).
    """
    _report(*_copy_in(model, state_dict), strict)
    return model


def to_hf_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """HF-named, HF-shaped weights of `model` as host numpy arrays in the parameters' dtype.

    Parameters must be fully addressable from this process (single host, or gathered first).
    """
    _, _, mapping_fn, _ = _ARCHS[_arch_of(model)]
    out = {}
    for hf_name, path, n_in in mapping_fn(model.config):
        arr = np.asarray(get_value(_variable(model, path)))
        if n_in:
            arr = arr.reshape(math.prod(arr.shape[:n_in]), -1).T
        elif hf_name.endswith(".bias"):
            arr = arr.reshape(-1)  # attention biases: (heads, head_dim) -> flat
        out[hf_name] = np.ascontiguousarray(arr)  # safetensors needs C-contiguous buffers
    return out


def _load(arch: str, source: Any, config: Any, strict: bool, rngs: nnx.Rngs | None, overrides: dict) -> Any:
    config_cls, model_cls, _, _ = _ARCHS[arch]
    if isinstance(source, (str, os.PathLike)):
        if config is None:
            with open(os.path.join(source, "config.json")) as f:
                config = json.load(f)
        source = read_safetensors_dir(str(source))
    if config is None:
        raise ValueError("a state dict needs a config (LlamaConfig/BertConfig, HF config, or config.json dict)")
    if not isinstance(config, config_cls):
        config = config_cls.from_hf(config, **overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    # Build abstract shapes first: when the checkpoint covers every parameter (the usual case),
    # random initialisation (compiled per weight shape) is never paid for.
    model = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
    arch, missing, unexpected = _copy_in(model, source)
    if missing and not strict:
        # Initialise only what is missing: jit the whole constructor but return just those values,
        # so XLA drops the unused random draws (a full eager init compiles an RNG per weight shape).
        paths = [path for _, path in missing]

        def init_missing(key):
            fresh = model_cls(config, rngs=nnx.Rngs(params=key))
            return [get_value(_variable(fresh, p)) for p in paths]

        key = (rngs if rngs is not None else nnx.Rngs(0)).params()
        for path, value in zip(paths, jax.jit(init_missing)(key)):
            set_value(_variable(model, path), value)
    _report(arch, missing, unexpected, strict)
    return model


def load_hf_llama(source: Any, config: Any = None, *, strict: bool = True, rngs: nnx.Rngs | None = None,
                  **overrides: Any) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` with the weights of an HF Llama checkpoint.

    source: a state dict (torch tensors or arrays, HF names) or a directory with config.json and
    model.safetensors. config: LlamaConfig, transformers.LlamaConfig or dict; read from the
    directory when omitted. overrides: LlamaConfig fields such as dtype=jnp.bfloat16, remat=True.
    """
    return _load("LlamaForCausalLM", source, config, strict, rngs, overrides)


def load_hf_bert(source: Any, config: Any = None, *, strict: bool = False, rngs: nnx.Rngs | None = None,
                 **overrides: Any) -> BertForSequenceClassification:
    """A `BertForSequenceClassification` with the weights of an HF BERT checkpoint.

    Like `load_hf_llama`, but non-strict by default: a base BERT checkpoint (no pooler/classifier)
    loads with freshly initialised head weights drawn from `rngs`, as HF does with a warning.
    """
    return _load("BertForSequenceClassification", source, config, strict, rngs, overrides)


def save_pretrained(model: nnx.Module, directory: str) -> str:
    """Write config.json + model.safetensors that `transformers.<Arch>.from_pretrained` loads."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    hf_config = model.config.to_hf()
    hf_config.dtype = jnp.dtype(model.config.param_dtype).name
    hf_config.save_pretrained(directory)
    # format=pt: transformers refuses safetensors files whose metadata names another framework.
    save_file(to_hf_state_dict(model), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return directory


def load_hf_t5(source: Any, config: Any = None, *, strict: bool = True, rngs: nnx.Rngs | None = None,
               **overrides: Any) -> T5ForConditionalGeneration:
    """A `T5ForConditionalGeneration` with the weights of an HF T5 checkpoint (model, state dict or directory).

    Like `load_hf_llama`; a transformers model may be passed directly (its state dict and config are used).
    """
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        source, config = source.state_dict(), config if config is not None else source.config
    return _load("T5ForConditionalGeneration", source, config, strict, rngs, overrides)


export_hf_llama = save_pretrained
export_hf_bert = save_pretrained
export_hf_t5 = save_pretrained


def from_pretrained(directory: str, *, strict: bool | None = None, rngs: nnx.Rngs | None = None,
                    **overrides: Any) -> nnx.Module:
    """Load a save_pretrained directory, choosing the model from config.json's `architectures`."""
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in _ARCHS), None)
    if arch is None:
        model_type = config.get("model_type")
        arch = {"llama": "LlamaForCausalLM", "bert": "BertForSequenceClassification",
                "t5": "T5ForConditionalGeneration"}.get(model_type)
    if arch is None:
        raise ValueError(f"unsupported architectures {archs} (model_type {config.get('model_type')!r})")
    if strict is None:
        strict = arch != "BertForSequenceClassification"
    return _load(arch, directory, config, strict, rngs, overrides)


__all__ = [
    "from_pretrained", "save_pretrained", "load_hf_llama", "load_hf_bert", "export_hf_llama", "export_hf_bert",
    "load_hf_t5", "export_hf_t5",
    "load_hf_state_dict", "to_hf_state_dict", "read_safetensors_dir",
]
