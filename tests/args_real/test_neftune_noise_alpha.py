"""neftune_noise_alpha: uniform noise of bound alpha / sqrt(seq_len * hidden) on the input embeddings of
training forward passes, none in evaluation; on torch and torch_xla (transformers' forward hook), and on
jax for xtrainer's Flax models and for torch modules through torchax, drawn from the step's RNG."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import xtrainer  # noqa: E402
from helpers import lm_data  # noqa: E402
from xtrainer.backends.torch.neftune import Neftune, input_embedding_modules, neftune_forward_hook  # noqa: E402

ALPHA = 5.0
SEQ, VOCAB, HIDDEN = 8, 64, 16
BOUND = ALPHA / math.sqrt(SEQ * HIDDEN)
DATA = lm_data(16, seq=SEQ, vocab=VOCAB)


def _gpt2():
    config = transformers.GPT2Config(n_layer=1, n_embd=HIDDEN, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _args(path, backend, alpha, seed=0, per_device=8, steps=2):
    return xtrainer.TrainingArguments(
        str(path), backend=backend, per_device_train_batch_size=per_device, per_device_eval_batch_size=per_device,
        max_steps=steps, logging_steps=1, learning_rate=1e-2, save_strategy="no", report_to="none",
        disable_tqdm=True, train_sampling_strategy="sequential", seed=seed, neftune_noise_alpha=alpha,
    )


def _run(model, path, backend, alpha, evaluate=True, train=True, **kw):
    """(eval loss before training or None, training losses or None) of one run."""
    trainer = xtrainer.Trainer(model=model, args=_args(path, backend, alpha, **kw), train_dataset=DATA,
                               eval_dataset=DATA[:8])
    eval_loss = trainer.evaluate()["eval_loss"] if evaluate else None
    if not train:
        return eval_loss, None
    trainer.train()
    return eval_loss, np.array([h["loss"] for h in trainer.state.log_history if "loss" in h])


# ------------------------------------------------------------------ torch


def test_torch_hook_equals_transformers_hook():
    from transformers.integrations.neftune import neftune_post_forward_hook

    embedding = torch.nn.Embedding(VOCAB, HIDDEN)
    embedding.neftune_noise_alpha = ALPHA
    ids = torch.randint(0, VOCAB, (4, SEQ))
    with torch.no_grad():
        clean = embedding(ids)
    torch.manual_seed(1)
    ours = neftune_forward_hook(embedding, (ids,), clean)
    torch.manual_seed(1)
    theirs = neftune_post_forward_hook(embedding, (ids,), clean)
    assert torch.equal(ours, theirs)
    noise = ours - clean
    assert float(noise.abs().max()) <= BOUND * (1 + 1e-6)
    assert float(noise.abs().max()) > 0.9 * BOUND  # uniform over the whole interval, not a smaller scale
    embedding.eval()
    assert torch.equal(neftune_forward_hook(embedding, (ids,), clean), clean)


def test_torch_backend_noises_training_embeddings_only(tmp_path):
    """The embeddings that reach GPT-2's first block carry noise of the exact bound in training; evaluation
    and the model after train() see none."""
    model = _gpt2()
    seen = []
    # GPT-2 adds the position embeddings and feeds the sum to its dropout module: capture that input.
    model.transformer.drop.register_forward_pre_hook(lambda module, inputs: seen.append((module.training, inputs[0])))
    trainer = xtrainer.Trainer(model=model, args=_args(tmp_path, "torch", ALPHA), train_dataset=DATA,
                               eval_dataset=DATA[:8])
    trainer.evaluate()
    trainer.train()
    ids = torch.tensor([row["input_ids"] for row in DATA[:8]])
    with torch.no_grad():
        first_clean = _gpt2().transformer.wte(ids) + _gpt2().transformer.wpe(torch.arange(SEQ))
    training = [x for is_training, x in seen if is_training]
    assert len(training) == 2 and not seen[0][0]  # one evaluation, then two training forwards
    assert torch.allclose(seen[0][1], first_clean, atol=1e-6)  # evaluation: no noise
    noise = training[0].detach() - first_clean
    assert float(noise.abs().max()) <= BOUND * (1 + 1e-5)
    assert float(noise.abs().max()) > 0.9 * BOUND
    assert not hasattr(model.transformer.wte, "neftune_noise_alpha") and not model.transformer.wte._forward_hooks


def test_torch_hooks_reach_t5_encoder_and_decoder_embeddings():
    """transformers 5.x's T5 embeds through encoder/decoder modules tied to `shared`: they get the noise too."""
    config = transformers.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(config)
    modules = input_embedding_modules(model)
    assert {id(m) for m in modules} == {id(model.shared), id(model.encoder.embed_tokens), id(model.decoder.embed_tokens)}
    neftune = Neftune(ALPHA, model)
    neftune.attach(model)
    captured = {}
    for name in ("encoder", "decoder"):
        embed = getattr(model, name).embed_tokens
        embed.register_forward_hook(lambda m, i, out, name=name: captured.update({name: (i[0], out.detach())}))
    model.train()
    ids = torch.randint(1, VOCAB, (2, SEQ))
    model(input_ids=ids, labels=ids)
    assert set(captured) == {"encoder", "decoder"}
    for name, (inputs, out) in captured.items():
        noise = out - torch.nn.functional.embedding(inputs, model.shared.weight).detach()
        assert 0.9 * BOUND < float(noise.abs().max()) <= BOUND * (1 + 1e-5), name
    neftune.detach()
    assert not any(neftune_forward_hook in m._forward_hooks.values() or hasattr(m, "neftune_noise_alpha")
                   for m in modules)


def test_torch_model_without_input_embeddings_is_refused(tmp_path):
    from helpers import RegressionModel

    with pytest.raises(ValueError, match="get_input_embeddings"):
        xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path, "torch", ALPHA))


# ------------------------------------------------------------------ jax: xtrainer's Flax models


def _flax_llama():
    from flax import nnx

    from xtrainer.models import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=SEQ, initializer_range=0.5)
    return LlamaForCausalLM(config, rngs=nnx.Rngs(0))


def test_jax_flax_llama_noise_follows_the_step_rng(tmp_path):
    pytest.importorskip("flax")
    # 8 fake devices x 1 = the global batch of 8.
    noisy_eval, noisy = _run(_flax_llama(), tmp_path / "a", "jax", ALPHA, per_device=1)
    _, other_seed = _run(_flax_llama(), tmp_path / "c", "jax", ALPHA, per_device=1, seed=1, evaluate=False)
    plain_eval, _ = _run(_flax_llama(), tmp_path / "d", "jax", None, per_device=1, train=False)
    assert noisy_eval == plain_eval  # evaluation: no noise
    # Llama has no dropout and the data order is fixed: the seed changes the losses only through the noise,
    # which the step draws from its RNG (seeded by args.seed).
    assert np.all(np.abs(noisy - other_seed) > 1e-4), (noisy, other_seed)


def test_jax_noise_has_the_exact_bound():
    """The noise xtrainer's Flax models add: uniform of bound alpha/sqrt(seq*hidden); none without a key or alpha."""
    pytest.importorskip("flax")
    import jax
    import jax.numpy as jnp

    from xtrainer.models._nn import neftune_noise

    key = jax.random.key(3)
    x = jnp.zeros((64, SEQ, HIDDEN))
    noise = np.asarray(neftune_noise(x, ALPHA, key))
    assert 0.99 * BOUND < np.abs(noise).max() <= BOUND
    assert np.array_equal(neftune_noise(x, ALPHA, None), x) and np.array_equal(neftune_noise(x, None, key), x)


@pytest.mark.slow
def test_jax_flax_bert_and_t5_add_noise_in_training_only():
    """BERT and T5 from xtrainer.models noise their input embedding when called in training mode with an
    RNG, and not when deterministic (Llama is checked through the Trainer above)."""
    pytest.importorskip("flax")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from xtrainer.models import BertConfig, BertForSequenceClassification, T5Config, T5ForConditionalGeneration

    key = jax.random.key(3)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, VOCAB, size=(2, SEQ)))
    bert = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32,
                                                    num_hidden_layers=1, num_attention_heads=2, hidden_dropout_prob=0.0,
                                                    attention_probs_dropout_prob=0.0, max_position_embeddings=SEQ),
                                         rngs=nnx.Rngs(0))
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=32, num_layers=1,
                                             num_heads=2, dropout_rate=0.0), rngs=nnx.Rngs(0))
    # Their dropout rates are 0: without the noise, a
    # training-mode call would give the deterministic call's logits.
    call = nnx.jit(lambda m, x, k, train: m(**x, deterministic=not train, rngs=nnx.Rngs(dropout=k))["logits"],
                   static_argnums=3)
    for model, inputs in ((bert, {"input_ids": ids}), (t5, {"input_ids": ids, "labels": ids})):
        model.get_input_embeddings().neftune_noise_alpha = ALPHA
        noisy, evaluated = call(model, inputs, key, True), call(model, inputs, key, False)
        assert not np.allclose(noisy, evaluated, atol=1e-4), type(model).__name__


def test_jax_flax_model_without_noisy_embeddings_is_refused(tmp_path):
    pytest.importorskip("flax")
    from flax import nnx
    from jax_models import RegressionMLP

    with pytest.raises(ValueError, match="get_input_embeddings"):
        xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=_args(tmp_path, "jax", ALPHA))


# ------------------------------------------------------------------ XLA lane: torchax and torch_xla


def test_torchax_gpt2_noise_follows_the_step_rng(tmp_path):
    pytest.importorskip("torchax")
    base = _gpt2()
    noisy_eval, noisy = _run(copy.deepcopy(base), tmp_path / "a", "jax", ALPHA, per_device=1)
    _, other_seed = _run(copy.deepcopy(base), tmp_path / "b", "jax", ALPHA, per_device=1, seed=1, evaluate=False)
    plain_eval, plain = _run(copy.deepcopy(base), tmp_path / "c", "jax", None, per_device=1)
    assert noisy_eval == pytest.approx(plain_eval, abs=1e-6)  # evaluation: no noise
    assert np.all(np.abs(noisy - plain) > 1e-4), (noisy, plain)
    # GPT-2's dropout is 0 and the data order is fixed: the seed changes the losses only through the noise.
    assert np.all(np.abs(noisy - other_seed) > 1e-4), (noisy, other_seed)


def test_torch_xla_noises_training_only(tmp_path):
    pytest.importorskip("torch_xla")
    base = _gpt2()
    noisy_eval, noisy = _run(copy.deepcopy(base), tmp_path / "a", "torch_xla", ALPHA, per_device=2)
    plain_eval, plain = _run(copy.deepcopy(base), tmp_path / "b", "torch_xla", None, per_device=2)
    assert noisy_eval == pytest.approx(plain_eval, abs=1e-5)
    assert np.all(np.abs(noisy - plain) > 1e-4), (noisy, plain)
