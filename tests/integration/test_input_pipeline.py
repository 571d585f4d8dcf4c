"""The input pipeline through the Trainer: worker processes, saved data positions, user loaders, shutdown."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import xtrainer
from helpers import RegressionModel, regression_data

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _args(tmp_path, backend="torch", **kw):
    base = dict(backend=backend, per_device_train_batch_size=4, learning_rate=0.05, logging_steps=1, report_to="none",
                disable_tqdm=True, seed=3, train_sampling_strategy="random", save_strategy="no")
    base.update(kw)
    return xtrainer.TrainingArguments(str(tmp_path), **base)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _noisy_collator(features):
    """A random collator (as MLM masking is): labels get noise from the global torch generator."""
    batch = xtrainer.data.default_data_collator(features)
    batch["labels"] = batch["labels"] + 0.1 * torch.randn(batch["labels"].shape).numpy()
    return batch


@pytest.mark.timeout(180)
def test_the_loss_curve_is_the_same_for_0_and_2_workers_on_torch_and_jax(tmp_path):
    nnx = pytest.importorskip("flax.nnx")
    from jax_models import RegressionMLP, regression_rows

    curves = {}
    for workers in (0, 2):
        kw = dict(num_train_epochs=2, dataloader_num_workers=workers, dataloader_persistent_workers=workers > 0)
        t = xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path / f"t{workers}", **kw),
                             train_dataset=regression_data(40), data_collator=_noisy_collator)
        t.train()
        j = xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=_args(tmp_path / f"j{workers}", "jax", per_device_train_batch_size=1, **kw),
                             train_dataset=regression_rows(40), data_collator=_noisy_collator)
        j.train()
        curves[workers] = (_losses(t), _losses(j))
    assert len(curves[0][0]) == 20 and len(curves[0][1]) == 10
    assert curves[0][0] == curves[2][0]  # torch: identical
    assert curves[0][1] == curves[2][1]  # jax: identical


@pytest.mark.timeout(180)
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_uses_the_saved_position(tmp_path, workers):
    kw = dict(max_steps=8, save_strategy="steps", save_steps=3, dataloader_num_workers=workers)
    data = regression_data(44)  # 11 batches per epoch: checkpoint-3 and -6 are mid-epoch, -9 would be in epoch 1
    full = xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path / "full", **kw), train_dataset=data,
                            data_collator=_noisy_collator)
    full.train()
    saved = json.load(open(tmp_path / "full" / "checkpoint-6" / "data_state" / "process-0.json"))
    assert saved["loader"]["epoch"] == 0 and saved["loader"]["batches_done"] == 6
    manifest = json.load(open(tmp_path / "full" / "checkpoint-6" / "xtrainer_manifest.json"))
    assert "data_state/process-0.json" in manifest["files"]
    resumed = xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path / "full", **kw), train_dataset=data,
                               data_collator=_noisy_collator)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    assert _losses(resumed) == _losses(full)
    assert resumed.model.a.item() == full.model.a.item()


def test_the_saved_position_is_what_resume_follows(tmp_path):
    """Edit the saved position: the resumed run follows the file, not the global step."""
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2)
    data = regression_data(44)
    first = xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path / "a", **kw), train_dataset=data)
    first.train()
    path = tmp_path / "a" / "checkpoint-2" / "data_state" / "process-0.json"
    record = json.load(open(path))
    record["loader"].update(batches_done=5, next_batch=5)
    json.dump(record, open(path, "w"))
    (tmp_path / "a" / "checkpoint-2" / "xtrainer_manifest.json").unlink()  # the edit would fail verification

    again = xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path / "a", **kw), train_dataset=data)
    again.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    resumed_logs = [h for h in again.state.log_history if "loss" in h and h["step"] > 2]
    assert [h["epoch"] for h in resumed_logs] == pytest.approx([6 / 11, 7 / 11])  # continued after batch 5, not 2


# ------------------------------------------------------------------ get_*_dataloader overrides


class _TorchRows(torch.utils.data.Dataset):
    def __init__(self, n):
        self.rows = regression_data(n)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_x": torch.tensor(self.rows[i]["input_x"]), "labels": torch.tensor(self.rows[i]["labels"])}


class OwnLoaders(xtrainer.Trainer):
    made = []

    def get_train_dataloader(self):
        loader = torch.utils.data.DataLoader(_TorchRows(24), batch_size=4, shuffle=True,
                                             generator=torch.Generator().manual_seed(0))
        self.made.append(loader)
        return loader

    def get_eval_dataloader(self, eval_dataset=None):
        return torch.utils.data.DataLoader(_TorchRows(10), batch_size=5)

    def get_test_dataloader(self, test_dataset):
        return torch.utils.data.DataLoader(_TorchRows(7), batch_size=3)


@pytest.mark.parametrize("backend", ["torch", "jax", "torch_xla"])
def test_overridden_get_dataloaders_returning_torch_dataloaders(tmp_path, backend):
    if backend == "torch_xla":
        pytest.importorskip("torch_xla")
    if backend == "jax":
        nnx = pytest.importorskip("flax.nnx")
        from jax_models import RegressionMLP

        model, per_device = RegressionMLP(nnx.Rngs(0)), 1
        rename = lambda d: {"x": np.repeat(np.asarray(d["input_x"])[:, None], 4, 1), "labels": d["labels"]}  # noqa: E731
    else:
        model, per_device, rename = RegressionModel(), 4, None

    class Trainer(OwnLoaders):
        def get_train_dataloader(self):
            loader = super().get_train_dataloader()
            if rename:
                loader.collate_fn = lambda rows: rename(torch.utils.data.default_collate(rows))
            return loader

        def get_eval_dataloader(self, eval_dataset=None):
            loader = super().get_eval_dataloader(eval_dataset)
            if rename:
                loader.collate_fn = lambda rows: rename(torch.utils.data.default_collate(rows))
            return loader

        def get_test_dataloader(self, test_dataset):
            loader = super().get_test_dataloader(test_dataset)
            if rename:
                loader.collate_fn = lambda rows: rename(torch.utils.data.default_collate(rows))
            return loader

    seen = {}

    class Spy(xtrainer.TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            seen["train"] = train_dataloader

    trainer = Trainer(model=model, args=_args(tmp_path, backend, num_train_epochs=2, per_device_train_batch_size=per_device,
                                              per_device_eval_batch_size=per_device),
                      callbacks=[Spy()])
    trainer.train()
    assert trainer.state.global_step == 12  # len(DataLoader) = 6 batches per epoch, 2 epochs
    assert isinstance(seen["train"], torch.utils.data.DataLoader)  # callbacks see the user's own object
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"])
    prediction = trainer.predict(None)
    assert prediction.predictions.shape[0] == 7 and prediction.metrics["test_samples_per_second"] > 0


class _Chained:
    """A user's loader with a length and nothing else (no dataset, no batch_size): two loaders in a row."""

    def __init__(self, loaders):
        self.loaders = loaders

    def __len__(self):
        return sum(len(loader) for loader in self.loaders)

    def __iter__(self):
        for loader in self.loaders:
            yield from loader


def test_a_loader_without_dataset_trains_and_evaluates_on_what_it_yields(tmp_path):
    class Trainer(xtrainer.Trainer):
        def get_train_dataloader(self):
            return _Chained([super().get_train_dataloader(), super().get_train_dataloader()])

        def get_eval_dataloader(self, eval_dataset=None):
            return _Chained([super().get_eval_dataloader(eval_dataset), super().get_eval_dataloader(eval_dataset)])

    rows = regression_data(12)
    trainer = Trainer(model=RegressionModel(), args=_args(tmp_path, num_train_epochs=1, per_device_eval_batch_size=5),
                      train_dataset=rows, eval_dataset=rows)
    trainer.train()
    assert trainer.state.global_step == 6  # 2 x 3 batches of 4, one epoch
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"]) and metrics["eval_steps_per_second"] > 0
    assert trainer.evaluation_loop(trainer.get_eval_dataloader(), "Evaluation").num_samples == 24  # what it yielded


def test_get_test_dataloader_is_what_predict_uses_and_loaders_expose_hf_attributes(tmp_path):
    asked = []

    class Trainer(xtrainer.Trainer):
        def get_test_dataloader(self, test_dataset):
            asked.append(test_dataset)
            return super().get_test_dataloader(test_dataset)

    data = regression_data(10)
    trainer = Trainer(model=RegressionModel(), args=_args(tmp_path, per_device_eval_batch_size=3), train_dataset=data)
    out = trainer.predict(data)
    assert asked == [data] and out.predictions.shape == (10,)
    loader = trainer.get_test_dataloader(data)
    assert len(loader) == 4 and loader.batch_size == 3 and loader.dataset is data
    train = trainer.get_train_dataloader()
    assert len(train) == 3 and train.batch_size == 4 and sorted(train.sampler) == list(range(10))
    with pytest.raises(TypeError, match="get_train_dataloader\\(\\) returned a int"):
        class Bad(xtrainer.Trainer):
            def get_train_dataloader(self):
                return 3

        Bad(model=RegressionModel(), args=_args(tmp_path, max_steps=1), train_dataset=data).train()


class StatefulBatches:
    """A user loader with torchdata's Stateful protocol (state_dict / load_state_dict), no length."""

    def __init__(self):
        self.position, self.loads = 0, []

    def __iter__(self):
        rows = regression_data(400)
        while True:
            chunk = rows[(4 * self.position) % 400:(4 * self.position) % 400 + 4]
            self.position += 1
            yield {"input_x": np.array([r["input_x"] for r in chunk], np.float32),
                   "labels": np.array([r["labels"] for r in chunk], np.float32)}

    def state_dict(self):
        return {"position": self.position, "token": b"\x00grain-like bytes"}

    def load_state_dict(self, state):
        self.loads.append(state)
        self.position = state["position"]


def test_a_stateful_user_loader_resumes_from_its_own_state(tmp_path):
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3)
    loaders = []

    class Trainer(xtrainer.Trainer):
        def get_train_dataloader(self):
            loaders.append(StatefulBatches())
            return loaders[-1]

    full = Trainer(model=RegressionModel(), args=_args(tmp_path, **kw))
    full.train()
    resumed = Trainer(model=RegressionModel(), args=_args(tmp_path, **kw))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert loaders[-1].loads == [{"position": 3, "token": b"\x00grain-like bytes"}]
    assert _losses(resumed) == _losses(full)


# ------------------------------------------------------------------ stopping


SCRIPT = """
import os, sys, time
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
import xtrainer
from helpers import RegressionModel, regression_data

class Slow:
    def __init__(self): self.rows = regression_data(400)
    def __len__(self): return len(self.rows)
    def __getitem__(self, i):
        import torch.utils.data
        if torch.utils.data.get_worker_info() is not None:
            open(os.path.join({pids!r}, str(os.getpid())), "w").close()
        time.sleep(0.01)
        return self.rows[i]

args = xtrainer.TrainingArguments({out!r}, max_steps=100000, per_device_train_batch_size=4, report_to="none",
                                  disable_tqdm=True, save_strategy="no", dataloader_num_workers=2,
                                  enable_jit_checkpoint=True,  # SIGTERM: save this step, then exit 143
                                  dataloader_persistent_workers={persistent})
xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=Slow()).train()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig,persistent", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_sigterm_and_ctrl_c_leave_no_worker_behind(tmp_path, sig, persistent):
    pids = tmp_path / "pids"
    pids.mkdir()
    code = SCRIPT.format(tests=os.path.dirname(HERE), root=ROOT, pids=str(pids), out=str(tmp_path / "out"), persistent=persistent)
    # Its own process group, as a job under a shell or a scheduler: the signal goes to every process of it.
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(os.listdir(pids)) < 2:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.1)
        time.sleep(0.5)  # a few steps with the workers running
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    workers = [int(p) for p in os.listdir(pids)]
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, err[-3000:]  # the preemption path: saved, then exit 143
        assert os.path.isfile(tmp_path / "out" / f"checkpoint-{_saved_step(tmp_path / 'out')}" / "data_state" / "process-0.json")
    else:
        assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert "exited unexpectedly" not in err and "killed by signal" not in err  # the workers did not die first
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)], "worker processes outlived the training process"


def _saved_step(out) -> int:
    names = [n for n in os.listdir(out) if n.startswith("checkpoint-")]
    assert len(names) == 1, names
    return int(names[0].split("-")[1])


class _PidRows:
    """Rows that record which process fetched them."""

    def __init__(self, directory, n=12):
        self.directory, self.rows = directory, regression_data(n)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        open(os.path.join(self.directory, str(os.getpid())), "w").close()
        return self.rows[i]


@pytest.mark.timeout(120)
def test_persistent_workers_serve_every_evaluation(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    data = _PidRows(str(pids))
    args = _args(tmp_path, dataloader_num_workers=2, dataloader_persistent_workers=True, per_device_eval_batch_size=3)
    trainer = xtrainer.Trainer(model=RegressionModel(), args=args, eval_dataset=data)
    first = trainer.evaluate()
    second = trainer.evaluate()
    assert first["eval_loss"] == second["eval_loss"]
    assert trainer.get_eval_dataloader() is trainer.get_eval_dataloader()
    assert len(os.listdir(pids)) == 2 and str(os.getpid()) not in os.listdir(pids)  # the same 2 workers, twice
    trainer.get_eval_dataloader().close()
