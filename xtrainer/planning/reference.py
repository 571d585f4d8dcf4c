"""Reference models to plan with, built without weights, and the model each TPU preset is planned with.

`abstract_llama("llama2-7b")` is xtrainer's reference Flax Llama (xtrainer.models.LlamaForCausalLM)
with the shapes of a published checkpoint, built under `nnx.eval_shape`: parameters are
`jax.ShapeDtypeStruct`s, so a 70B model costs no memory. `hf_llama_on_meta(...)` is transformers'
PyTorch `LlamaForCausalLM` on the meta device, for planning through torchax.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Shapes of published Llama configurations (config.json of the checkpoints named; vocab 32000, the
# Llama 2 tokenizer): layers, hidden, intermediate, heads, kv heads.
REFERENCE_LLAMAS: dict[str, dict[str, int]] = {
    # A tiny model for tests: compiles in seconds.
    "llama-tiny": dict(num_hidden_layers=2, hidden_size=256, intermediate_size=688, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=2048),
    # A 0.37B shape of xtrainer's own, sized for one 16 GiB chip (its AdamW training state is 5.9 GB).
    "llama-400m": dict(num_hidden_layers=24, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=32000),
    # TinyLlama-1.1B (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T)
    "llama-1b": dict(num_hidden_layers=22, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000),
    # OpenLLaMA 3B (openlm-research/open_llama_3b)
    "llama-3b": dict(num_hidden_layers=26, hidden_size=3200, intermediate_size=8640, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    # Llama 2 7B / 13B / 70B (meta-llama/Llama-2-*-hf)
    "llama2-7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama2-13b": dict(num_hidden_layers=40, hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000),
    "llama2-70b": dict(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000),
}


def llama_config(name: str, **overrides: Any):
    """The LlamaConfig of a reference size: bf16 compute, fp32 parameters (master weights), per-layer remat.

    Overrides set any LlamaConfig field (remat=False, remat_policy="minimal", num_hidden_layers=..., ...).
    """
    import jax.numpy as jnp

    from ..models.llama import LlamaConfig

    if name not in REFERENCE_LLAMAS:
        raise ValueError(f"Unknown reference model {name!r}; choose one of {sorted(REFERENCE_LLAMAS)}.")
    fields = dict(REFERENCE_LLAMAS[name], max_position_embeddings=4096, dtype=jnp.bfloat16,
                  param_dtype=jnp.float32, remat=True)
    fields.update(overrides)
    return LlamaConfig(**fields)


def abstract_llama(name_or_config: Any, **overrides: Any):
    """xtrainer's reference Flax Llama with no weights (nnx.eval_shape): for planning only."""
    from flax import nnx

    from ..models.llama import LlamaConfig, LlamaForCausalLM

    config = name_or_config if isinstance(name_or_config, LlamaConfig) else llama_config(name_or_config, **overrides)
    if isinstance(name_or_config, LlamaConfig) and overrides:
        config = dataclasses.replace(config, **overrides)
    return nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))


def hf_llama_on_meta(name: str, **overrides: Any):
    """transformers' PyTorch LlamaForCausalLM of a reference size, on the meta device (no weights)."""
    import torch
    import transformers

    fields = dict(REFERENCE_LLAMAS[name], max_position_embeddings=4096, tie_word_embeddings=False)
    fields.update(overrides)
    config = transformers.LlamaConfig(**fields)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


@dataclass(frozen=True)
class PresetPlan:
    """The reference model each preset is planned with (tpu_configs/README.md's table), and why."""

    model: str
    per_device_batch: int
    seq_len: int
    why: str
    remat_policy: str = "full"
    mesh: dict | None = None  # None: the preset's mesh


# Sizes: parameters + gradients + fp32 AdamW take 16 bytes per parameter spread over the slice; the
# rest of HBM holds activations (per-layer remat keeps one hidden state per layer).
PRESET_PLANS: dict[str, PresetPlan] = {
    "v5e-1": PresetPlan("llama-400m", 4, 2048, "one 16 GiB chip: a 1.1B model's weights, gradients and fp32 AdamW "
                                               "state (16 bytes x 1.1B = 17.6 GB) alone would not fit"),
    "v5litepod-4": PresetPlan("llama-1b", 4, 2048, "4 x 16 GiB: 1.1B x 16 bytes = 17.6 GB spread over 4 chips"),
    "v5litepod-8": PresetPlan("llama-1b", 8, 2048, "8 x 16 GiB: 1B with a bigger batch (3B's state would take "
                                                   "6.8 GB of each 16 GiB chip)"),
    "v5litepod-16": PresetPlan("llama2-7b", 2, 2048, "16 x 16 GiB: 7B's 108 GB of state is 6.7 GB per chip"),
    "v5litepod-256": PresetPlan("llama2-13b", 2, 2048, "256 x 16 GiB: 13B at 0.8 GB of state per chip; 70B is "
                                                       "planned on v6e-256"),
    "v4-8": PresetPlan("llama-3b", 4, 2048, "4 x 32 GiB: 3.4B x 16 bytes = 55 GB, 14 GB per chip"),
    "v4-32": PresetPlan("llama2-13b", 1, 2048, "16 x 32 GiB: 13B x 16 bytes = 208 GB, 13 GB per chip"),
    "v5p-8": PresetPlan("llama2-7b", 4, 4096, "4 x 95 GiB: 7B's 108 GB is 27 GB per chip, room for 4 x 4096 tokens"),
    "v5p-128": PresetPlan("llama2-7b", 4, 4096, "64 x 95 GiB: MaxText's Llama2-7B recipe (4 x 4096 tokens per "
                                                "device, remat_policy=minimal; bench/RESULTS.md compares)",
                          remat_policy="minimal"),
    "v6e-1": PresetPlan("llama-1b", 1, 2048, "one 32 GiB chip: 1.1B x 16 bytes = 17.6 GB of state fits"),
    "v6e-8": PresetPlan("llama2-7b", 1, 2048, "8 x 32 GiB: 7B's 108 GB is 13.5 GB per chip"),
    "v6e-256": PresetPlan("llama2-70b", 1, 2048, "256 x 32 GiB: 70B x 16 bytes = 1.1 TB, 4.3 GB per chip"),
}
