"""HF name mapping of `T5ForConditionalGeneration` (used by `hf_interop`'s import/export).

Owns the (hf_name, path in the NNX model, n_in) triples for T5; `hf_interop` applies them
(n_in > 0 marks a torch Linear weight with n_in input axes, transposed and reshaped on the way).
HF keeps each stack's relative-attention-bias table in block 0's self-attention and repeats the
shared embedding as encoder/decoder.embed_tokens; our stacks own the table and the model owns one
`shared` embedding, so those duplicates are skipped on import and not written on export.
"""

from __future__ import annotations

from .t5 import T5Config

# Keys a T5 checkpoint may carry that duplicate `shared.weight` or are unused by design.
T5_IGNORED_SUFFIXES = (
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "EncDecAttention.relative_attention_bias.weight",
)


def t5_mapping(cfg: T5Config) -> list[tuple[str, tuple, int]]:
    """(hf_name, NNX path, n_in) for every parameter of a T5ForConditionalGeneration with `cfg`."""
    m = [("shared.weight", ("shared", "embedding"), 0)]
    ff = ("wi_0", "wi_1", "wo") if cfg.is_gated else ("wi", "wo")
    for stack, layers in (("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers)):
        m.append((f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                  (stack, "relative_attention_bias", "embedding"), 0))
        for i in range(layers):
            hf, ours = f"{stack}.block.{i}.layer.", (stack, "block", i)
            sublayers = [("0", "SelfAttention", "self_attn")]
            if stack == "decoder":
                sublayers.append(("1", "EncDecAttention", "cross_attn"))
            for idx, hf_attn, attn in sublayers:
                for proj, n_in in (("q", 1), ("k", 1), ("v", 1), ("o", 2)):
                    m.append((f"{hf}{idx}.{hf_attn}.{proj}.weight", ours + (attn, proj, "kernel"), n_in))
                m.append((f"{hf}{idx}.layer_norm.weight", ours + (f"{attn}_norm", "scale"), 0))
            ff_idx = len(sublayers)
            for proj in ff:
                m.append((f"{hf}{ff_idx}.DenseReluDense.{proj}.weight", ours + ("ff", proj, "kernel"), 1))
            m.append((f"{hf}{ff_idx}.layer_norm.weight", ours + ("ff_norm", "scale"), 0))
        m.append((f"{stack}.final_layer_norm.weight", (stack, "final_layer_norm", "scale"), 0))
    if not cfg.tie_word_embeddings:
        m.append(("lm_head.weight", ("lm_head", "kernel"), 1))
    return m
