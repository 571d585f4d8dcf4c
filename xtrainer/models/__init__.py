"""Reference Flax NNX models for the JAX backend, with transformers weight interchange.

Owns the public names of the subpackage: `LlamaConfig`/`LlamaForCausalLM`,
`BertConfig`/`BertForSequenceClassification`, `T5Config`/`T5ForConditionalGeneration`, their
losses, HF import/export, and the logical-axis helpers (names documented in
`xtrainer.models.sharding`). Jitted greedy/beam decoding lives in `xtrainer.models.generation`.
Requires jax and flax; transformers only for `to_hf()` / `save_pretrained`, torch only to read
torch state dicts.
"""

from .bert import BertConfig, BertForSequenceClassification, sequence_classification_loss
from .hf_interop import (
    export_hf_bert,
    export_hf_llama,
    from_pretrained,
    load_hf_bert,
    load_hf_llama,
    export_hf_t5,
    load_hf_state_dict,
    load_hf_t5,
    read_safetensors_dir,
    save_pretrained,
    to_hf_state_dict,
)
from .llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss
from .t5 import T5Config, T5ForConditionalGeneration, seq2seq_lm_loss
from .sharding import EXAMPLE_RULES, LOGICAL_AXIS_NAMES, logical_axes, logical_partition_specs

__all__ = [
    "LlamaConfig",
    "LlamaForCausalLM",
    "causal_lm_loss",
    "BertConfig",
    "BertForSequenceClassification",
    "sequence_classification_loss",
    "T5Config",
    "T5ForConditionalGeneration",
    "seq2seq_lm_loss",
    "load_hf_t5",
    "export_hf_t5",
    "load_hf_llama",
    "load_hf_bert",
    "export_hf_llama",
    "export_hf_bert",
    "from_pretrained",
    "save_pretrained",
    "load_hf_state_dict",
    "to_hf_state_dict",
    "read_safetensors_dir",
    "LOGICAL_AXIS_NAMES",
    "EXAMPLE_RULES",
    "logical_axes",
    "logical_partition_specs",
]
