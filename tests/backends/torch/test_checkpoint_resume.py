"""Checkpoints on the torch backend: exact mid-epoch resume, and both directions with transformers' Trainer."""

import copy
import os
import shutil

import pytest
import torch
import transformers

import xtrainer
from helpers import RegressionModel, lm_data, regression_data, tiny_gpt2


def _gpt2_with_dropout():
    model = tiny_gpt2(seed=3)
    for module in model.modules():  # dropout makes the test depend on the restored RNG state
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    return model


ARGS = dict(
    per_device_train_batch_size=4,
    learning_rate=2e-3,
    max_steps=8,
    save_steps=3,
    logging_steps=1,
    report_to="none",
    disable_tqdm=True,
    seed=11,
)


def _assert_same_weights(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], rtol=0, atol=atol, msg=name)


class StepCounter(transformers.TrainerCallback):
    """Counts optimizer steps actually run (a resume that silently restarted would run them all)."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def _losses(history, after=0):
    return {h["step"]: h["loss"] for h in history if "loss" in h and h["step"] > after}


def test_mid_epoch_resume_equals_uninterrupted_run(tmp_path):
    data = lm_data(28)  # 7 batches per epoch: checkpoint-3 and checkpoint-6 fall mid-epoch
    base = _gpt2_with_dropout()
    args = xtrainer.TrainingArguments(str(tmp_path / "run"), train_sampling_strategy="random", **ARGS)
    full = xtrainer.Trainer(model=copy.deepcopy(base), args=args, train_dataset=data)
    full.train()
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    expected = set(os.listdir(tmp_path / "run" / "checkpoint-3"))
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json", "training_args.bin"} <= expected

    for start in (3, 6):
        counter = StepCounter()
        resumed = xtrainer.Trainer(model=copy.deepcopy(base), args=args, train_dataset=data, callbacks=[counter])
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{start}"))
        _assert_same_weights(full.model, resumed.model, atol=1e-6)
        assert _losses(resumed.state.log_history, start) == pytest.approx(_losses(full.state.log_history, start), rel=1e-6)
        steps = [h["step"] for h in resumed.state.log_history if "loss" in h]
        assert steps == list(range(1, 9))  # history before the checkpoint kept, no gap, no duplicate
        assert counter.steps == 8 - start


def test_resume_true_picks_newest_complete_checkpoint(tmp_path):
    data = regression_data(24)
    args = xtrainer.TrainingArguments(str(tmp_path), **{**ARGS, "learning_rate": 0.05})
    xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=data).train()
    shutil.rmtree(tmp_path / "checkpoint-8")
    os.makedirs(tmp_path / "tmp-checkpoint-9")  # a save that was killed half-way
    trainer = xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=data)
    seen = []

    class Record(xtrainer.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.append(state.global_step)

    trainer.add_callback(Record())
    trainer.train(resume_from_checkpoint=True)
    assert seen == [6] and trainer.state.global_step == 8


def test_hf_checkpoint_resumes_in_xtrainer(tmp_path):
    data = lm_data(24)
    base = tiny_gpt2(seed=5)
    kwargs = dict(ARGS, train_sampling_strategy="sequential", max_steps=6)
    hf = transformers.Trainer(model=copy.deepcopy(base), args=transformers.TrainingArguments(str(tmp_path / "hf"), **kwargs),
                              train_dataset=data)
    hf.train()
    counter = StepCounter()
    xt = xtrainer.Trainer(model=copy.deepcopy(base), args=xtrainer.TrainingArguments(str(tmp_path / "xt"), **kwargs),
                          train_dataset=data, callbacks=[counter])
    xt.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-3"))
    assert counter.steps == 3
    _assert_same_weights(hf.model, xt.model, atol=1e-6)
    assert _losses(xt.state.log_history, 3) == pytest.approx(_losses(hf.state.log_history, 3), rel=1e-6)


def test_xtrainer_checkpoint_resumes_in_hf(tmp_path):
    data = lm_data(24)
    base = tiny_gpt2(seed=6)
    kwargs = dict(ARGS, train_sampling_strategy="sequential", max_steps=6)
    xt = xtrainer.Trainer(model=copy.deepcopy(base), args=xtrainer.TrainingArguments(str(tmp_path / "xt"), **kwargs),
                          train_dataset=data)
    xt.train()
    counter = StepCounter()
    hf = transformers.Trainer(model=copy.deepcopy(base), args=transformers.TrainingArguments(str(tmp_path / "hf"), **kwargs),
                              train_dataset=data, callbacks=[counter])
    hf.train(resume_from_checkpoint=str(tmp_path / "xt" / "checkpoint-3"))
    assert counter.steps == 3
    _assert_same_weights(xt.model, hf.model, atol=1e-6)
    assert _losses(hf.state.log_history, 3) == pytest.approx(_losses(xt.state.log_history, 3), rel=1e-6)


def test_crash_during_save_keeps_earlier_checkpoints_and_history(tmp_path, monkeypatch):
    data = regression_data(24)
    args = xtrainer.TrainingArguments(str(tmp_path), **{**ARGS, "learning_rate": 0.05})
    trainer = xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=data)
    real_save = trainer.backend.save

    def failing_save(state, directory, **kw):
        if directory.endswith("-6"):
            real_save(state, directory, **kw)  # half the files are on disk when the "disk fills up"
            raise OSError("No space left on device")
        return real_save(state, directory, **kw)

    monkeypatch.setattr(trainer.backend, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3"]
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert xtrainer.get_last_checkpoint(str(tmp_path)).endswith("checkpoint-3")


def test_corrupt_or_foreign_checkpoint_errors_name_the_problem(tmp_path):
    data = regression_data(24)
    args = xtrainer.TrainingArguments(str(tmp_path / "r"), **{**ARGS, "learning_rate": 0.05, "max_steps": 3})
    xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=data).train()
    ckpt_dir = tmp_path / "r" / "checkpoint-3"
    # A checkpoint of a different model.
    foreign = xtrainer.Trainer(model=tiny_gpt2(), args=xtrainer.TrainingArguments(str(tmp_path / "g"), **ARGS),
                               train_dataset=lm_data(8))
    with pytest.raises(ValueError, match="does not match GPT2LMHeadModel"):
        foreign.train(resume_from_checkpoint=str(ckpt_dir))
    # A truncated weights file.
    weights = ckpt_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    trainer = xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=data)
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated"):  # the manifest catches it first
        trainer.train(resume_from_checkpoint=str(ckpt_dir))
    (ckpt_dir / "xtrainer_manifest.json").unlink()  # without a manifest, the loader itself must still say so
    with pytest.raises(ValueError, match="Cannot read the model weights"):
        trainer.train(resume_from_checkpoint=str(ckpt_dir))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "missing"))


class _OrderRecorder(torch.nn.Module):
    """Appends the index of every example it sees to a buffer that grows, so a checkpoint's buffer
    has another shape than a fresh model's; its own load_state_dict resizes the buffer first."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 1)
        self.seen = torch.nn.Buffer(torch.empty(0, dtype=torch.long))

    def forward(self, input_x, index, labels=None):
        if self.training:
            self.seen = torch.cat([self.seen, index.long()])
        y = self.fc(torch.stack([input_x, input_x * input_x], dim=-1)).squeeze(-1)
        return (torch.nn.functional.mse_loss(y, labels), y)

    def load_state_dict(self, state_dict, strict=True):
        if "seen" in state_dict:
            self.seen = torch.empty_like(state_dict["seen"])
        return super().load_state_dict(state_dict, strict)


def test_a_model_with_its_own_load_state_dict_resumes_with_the_same_data_order(tmp_path):
    data = [{**row, "index": i} for i, row in enumerate(regression_data(24))]
    args = xtrainer.TrainingArguments(str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2, save_steps=4,
                                      report_to="none", backend="torch", train_sampling_strategy="random")
    torch.manual_seed(0)
    full = xtrainer.Trainer(model=_OrderRecorder(), args=args, train_dataset=data)
    full.train()
    order = full.model.seen.tolist()
    assert sorted(order) == sorted(list(range(24)) * 2)

    torch.manual_seed(0)
    resumed = xtrainer.Trainer(model=_OrderRecorder(), args=args, train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))  # mid-epoch 2 (6 steps per epoch)
    assert resumed.model.seen.tolist() == order  # the buffer came back at its saved length, then grew alike
    _assert_same_weights(full.model, resumed.model, atol=1e-6)
