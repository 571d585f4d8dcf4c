"""Torch modules on the JAX backend through torchax (XLA lane): parity with the torch backend, weights back."""

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("torchax")
transformers = pytest.importorskip("transformers")

import xtrainer  # noqa: E402
from helpers import lm_data  # noqa: E402

STEPS = 20


def _gpt2():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=96, n_positions=32, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _llama():
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _bert():
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=32, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _t5():
    config = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config)


def _classification_data(n=32, seq=12, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(1, 96, size=seq).tolist(), "attention_mask": [1] * seq, "labels": int(rng.integers(0, 3))}
            for _ in range(n)]


def _seq2seq_data(n=32, seq=8, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        ids = rng.integers(1, 96, size=seq)
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * seq, "labels": ids[::-1].tolist()})
    return rows


MODELS = {"gpt2": (_gpt2, lm_data), "llama": (_llama, lm_data), "bert": (_bert, _classification_data),
          "t5": (_t5, _seq2seq_data)}


def _train(model, data, tmp_path, backend, **kw):
    # 8 fake JAX devices: per-device 1 on JAX is the same global batch as 8 on torch.
    per_device = 1 if backend == "jax" else 8
    args = xtrainer.TrainingArguments(str(tmp_path), backend=backend, per_device_train_batch_size=per_device,
                                      max_steps=STEPS, logging_steps=1, learning_rate=1e-3, save_strategy="no",
                                      report_to="none", disable_tqdm=True, train_sampling_strategy="sequential", **kw)
    trainer = xtrainer.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return trainer, np.array([h["loss"] for h in trainer.state.log_history if "loss" in h])


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_curve_matches_the_torch_backend(tmp_path, name):
    make, data_fn = MODELS[name]
    base, data = make(), data_fn(32)
    jax_trainer, jax_losses = _train(copy.deepcopy(base), data, tmp_path / "jax", "jax")
    torch_trainer, torch_losses = _train(copy.deepcopy(base), data, tmp_path / "torch", "torch")
    assert jax_trainer.backend.name == "jax" and jax_trainer.backend.adapter.kind == "torchax"
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-4, atol=1e-5)
    # The torch module itself holds the trained weights.
    for (n, a), b in zip(jax_trainer.model.state_dict().items(), torch_trainer.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=n)


def test_save_model_writes_what_transformers_loads(tmp_path):
    trainer, _ = _train(_gpt2(), lm_data(16), tmp_path / "run", "jax")
    trainer.save_model(str(tmp_path / "export"))
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "export"))
    for (name, a), b in zip(reloaded.state_dict().items(), trainer.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_sharding_rules_use_torch_parameter_names(tmp_path):
    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax", mesh={"data": 2, "fsdp": 4},
                                      sharding_rules=[[r"wte\.weight", ["fsdp", None]], [r"c_fc\.weight", [None, "fsdp"]]])
    trainer = xtrainer.Trainer(model=_gpt2(), args=args)
    params = trainer.backend.params
    assert tuple(params["transformer.wte.weight"].sharding.spec) == ("fsdp", None)
    assert tuple(params["transformer.h.0.mlp.c_fc.weight"].sharding.spec) == (None, "fsdp")


def test_frozen_parameters_stay_frozen_as_on_the_torch_backend(tmp_path):
    """requires_grad=False (a frozen embedding) keeps its weights on jax, as torch's optimizer never sees them."""
    base = _gpt2()
    base.transformer.wte.weight.requires_grad_(False)  # tied to lm_head: both stay
    base.transformer.wpe.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    jax_trainer, jax_losses = _train(copy.deepcopy(base), lm_data(32), tmp_path / "jax", "jax")
    torch_trainer, torch_losses = _train(copy.deepcopy(base), lm_data(32), tmp_path / "torch", "torch")
    assert jax_trainer.get_num_trainable_parameters() == torch_trainer.get_num_trainable_parameters() == sum(
        p.numel() for p in base.parameters() if p.requires_grad)
    trained = dict(jax_trainer.model.named_parameters())
    torch.testing.assert_close(trained["transformer.wte.weight"], before["transformer.wte.weight"], rtol=0, atol=0)
    torch.testing.assert_close(trained["transformer.wpe.weight"], before["transformer.wpe.weight"], rtol=0, atol=0)
    assert not torch.equal(trained["transformer.h.0.mlp.c_fc.weight"], before["transformer.h.0.mlp.c_fc.weight"])
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-4, atol=1e-5)


def test_a_layer_frozen_after_the_trainer_is_built_stays_frozen(tmp_path):
    """transformers scripts freeze layers between Trainer(...) and train(); the jax step follows."""
    model = _gpt2()
    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax", max_steps=2, report_to="none", save_strategy="no",
                                      learning_rate=1e-2)
    trainer = xtrainer.Trainer(model=model, args=args, train_dataset=lm_data(16))
    total = sum(p.numel() for p in model.parameters())
    assert trainer.get_num_trainable_parameters() == total
    frozen = model.transformer.h[0].mlp.c_fc.weight
    frozen.requires_grad_(False)
    assert trainer.get_num_trainable_parameters() == total - frozen.numel()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    torch.testing.assert_close(after["transformer.h.0.mlp.c_fc.weight"], before["transformer.h.0.mlp.c_fc.weight"],
                               rtol=0, atol=0)
    assert not torch.equal(after["transformer.h.0.mlp.c_proj.weight"], before["transformer.h.0.mlp.c_proj.weight"])
