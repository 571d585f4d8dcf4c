"""The JAX backend on the reference Flax Llama against the torch backend on transformers' Llama.

Both start from the same weights and see the same data order: their loss curves agree over 20 steps.
"""

import copy

import numpy as np
import pytest
import torch
import transformers

pytest.importorskip("flax")

import xtrainer  # noqa: E402
from helpers import lm_data  # noqa: E402
from xtrainer.models import LlamaForCausalLM, load_hf_llama  # noqa: E402

STEPS = 20


def _hf_llama():
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _args(tmp_path, backend, per_device):
    return xtrainer.TrainingArguments(
        str(tmp_path), backend=backend, per_device_train_batch_size=per_device, max_steps=STEPS, logging_steps=1,
        learning_rate=3e-3, weight_decay=0.1, warmup_steps=3, lr_scheduler_type="cosine", save_strategy="no",
        report_to="none", disable_tqdm=True, train_sampling_strategy="sequential",
    )


def test_jax_reference_llama_matches_torch_hf_llama(tmp_path):
    hf = _hf_llama()
    flax_model = load_hf_llama(hf.state_dict(), hf.config)
    assert isinstance(flax_model, LlamaForCausalLM)
    data = lm_data(48)  # masked label tails: token counts differ per batch
    # Global batch 8 on both: 8 fake JAX devices x 1, one torch process x 8.
    torch_run = xtrainer.Trainer(model=copy.deepcopy(hf), args=_args(tmp_path / "t", "torch", 8), train_dataset=data)
    torch_run.train()
    jax_run = xtrainer.Trainer(model=flax_model, args=_args(tmp_path / "j", "jax", 1), train_dataset=data)
    jax_run.train()
    curve = lambda t: np.array([h["loss"] for h in t.state.log_history if "loss" in h])  # noqa: E731
    torch_losses, jax_losses = curve(torch_run), curve(jax_run)
    assert len(torch_losses) == len(jax_losses) == STEPS
    np.testing.assert_allclose(jax_losses, torch_losses, atol=1e-3, rtol=0)
    assert torch_losses[-1] < torch_losses[0] - 0.2  # the curve really moves
    # The trained Flax weights exported in transformers' format agree with the torch run's weights.
    jax_run.save_model(str(tmp_path / "export"))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "export"))
    for (name, a), b in zip(reloaded.state_dict().items(), torch_run.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-3, msg=name)
