"""A transformers torch model trained on the jax backend (torchax) keeps transformers' surface: checkpoints hold
its model files, and metrics code gets torch tensors."""

import os

import numpy as np
import pytest
import torch

pytest.importorskip("torchax")
transformers = pytest.importorskip("transformers")

import xtrainer  # noqa: E402
from helpers import lm_data, tiny_gpt2  # noqa: E402


def test_torchax_checkpoints_have_model_files_and_metrics_see_torch_tensors(tmp_path):
    seen = []

    def preprocess(logits, labels):
        seen.append((type(logits), type(labels)))
        return logits.argmax(-1)  # torch code

    def metrics(prediction):
        return {"n": float(np.asarray(prediction.predictions).size)}

    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax", per_device_train_batch_size=1,
                                      per_device_eval_batch_size=1, max_steps=2, save_steps=2, report_to="none",
                                      disable_tqdm=True)
    data = lm_data(16)
    trainer = xtrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=data, eval_dataset=data[:8],
                               preprocess_logits_for_metrics=preprocess, compute_metrics=metrics)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "jax_state").is_dir()
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(checkpoint))
    trained = dict(trainer.model.named_parameters())
    for name, value in reloaded.named_parameters():
        np.testing.assert_allclose(value.detach().numpy(), trained[name].detach().numpy(), atol=1e-6)
    assert trainer.evaluate()["eval_n"] == 8 * 16
    assert seen and all(kind is torch.Tensor for pair in seen for kind in pair)


def test_optimizer_groups_are_the_decay_split_over_the_users_parameters(tmp_path):
    model = tiny_gpt2()
    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax", learning_rate=3e-4, report_to="none")
    trainer = xtrainer.Trainer(model=model, args=args)
    with pytest.raises(ValueError, match="optimizer is None"):
        trainer.get_optimizer_group()
    trainer.create_optimizer()
    decay, no_decay = trainer.get_optimizer_group()
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay} == set(trainer.get_decay_parameter_names(model))
    assert all(n.endswith("bias") or ".ln_" in n for n in (names[id(p)] for p in no_decay))
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    weight = model.transformer.h[0].mlp.c_fc.weight
    assert trainer.get_optimizer_group(weight)["weight_decay"] == args.weight_decay
    assert trainer.get_optimizer_group(model.transformer.h[0].mlp.c_fc.bias)["weight_decay"] == 0.0
    trainer.create_scheduler(num_training_steps=10, optimizer=trainer.optimizer)
    assert trainer.get_learning_rates() == [pytest.approx(3e-4 * trainer.lr_scheduler.multiplier(0))] * 2


class _PlainClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(10, 2)

    def forward(self, input_ids, labels=None):
        logits = self.linear(input_ids)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_a_plain_torch_module_is_saved_as_model_safetensors_in_checkpoints_and_save_model(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    data = [{"input_ids": torch.rand(10), "labels": int(i % 2)} for i in range(16)]
    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax", per_device_train_batch_size=1, max_steps=2,
                                      save_steps=2, report_to="none", disable_tqdm=True)
    trainer = xtrainer.Trainer(model=_PlainClassifier(), args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "export"))
    for directory in (tmp_path / "checkpoint-2", tmp_path / "export"):
        weights = load_file(str(directory / "model.safetensors"))
        torch.testing.assert_close(weights["linear.weight"], trainer.model.linear.weight.detach(), rtol=0, atol=0)


class _OutOfMemoryAtBatchAbove(xtrainer.TrainerCallback):
    """Raises an out-of-memory error after a step whose batch exceeded `limit` rows (the step's inputs were
    donated by then)."""

    def __init__(self, trainer_ref, limit):
        self.trainer_ref, self.limit = trainer_ref, limit

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer_ref[0]._train_batch_size > self.limit:
            raise RuntimeError("CUDA out of memory.")


def test_auto_find_batch_size_restarts_a_torch_module_after_its_step_donated_the_weights(tmp_path):
    import copy

    torch.manual_seed(0)
    data = [{"input_ids": torch.rand(10), "labels": int(i % 2)} for i in range(64)]
    model = _PlainClassifier()
    initial = copy.deepcopy(model)

    def run(m, out, callbacks=(), **kw):
        args = xtrainer.TrainingArguments(str(out), backend="jax", max_steps=2, save_strategy="no", report_to="none",
                                          disable_tqdm=True, learning_rate=0.1, train_sampling_strategy="sequential",
                                          **kw)
        trainer = xtrainer.Trainer(model=m, args=args, train_dataset=data, callbacks=list(callbacks))
        return trainer

    ref = []
    searched = run(model, tmp_path / "a", [_OutOfMemoryAtBatchAbove(ref, 1)], per_device_train_batch_size=2,
                   auto_find_batch_size=True)
    ref.append(searched)
    searched.train()
    assert searched._train_batch_size == 1 and searched.state.global_step == 2
    # The second attempt started from the module's own weights, not from the weights of the failed attempt's step.
    direct = run(initial, tmp_path / "b", per_device_train_batch_size=1)
    direct.train()
    torch.testing.assert_close(searched.model.linear.weight, direct.model.linear.weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(searched.model.linear.bias, direct.model.linear.bias, rtol=1e-6, atol=1e-6)
