"""Every `optim` value that runs on torch CPU, trained by the Trainer, against the same library optimizer run by
hand the way transformers' Trainer runs it (its get_optimizer_cls_and_kwargs, get_scheduler, LOMO's fused
backward, schedule-free train()). Metric-driven schedulers, optimizer_cls_and_kwargs and the refusals."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

import xtrainer
from xtrainer.optimizers import SUPPORT, supported_optimizers
from xtrainer.trainer_utils import OptimizerNames

BASE = dict(per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            train_sampling_strategy="sequential", max_grad_norm=0.0, learning_rate=1e-2, weight_decay=0.1,
            warmup_steps=1, lr_scheduler_type="linear", max_steps=3)
STEPS = BASE["max_steps"]
MODULES = {"galore-torch": "galore_torch", "lomo-optim": "lomo_optim", "apollo-torch": "apollo_torch",
           "torch-optimi": "optimi"}


class Net(nn.Module):
    """Linear layers for GaLore/APOLLO, one with 4096 weights (bitsandbytes' 8-bit states start there), a norm."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(4, 64)
        self.hidden = nn.Linear(64, 64)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 1)

    def forward(self, x, labels=None):
        y = self.head(self.norm(torch.relu(self.hidden(torch.relu(self.inp(x)))))).squeeze(-1)
        return (nn.functional.mse_loss(y, labels), y) if labels is not None else (y,)


def rows(n: int = 4 * STEPS) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(-1) * 0.5 + 0.1
    return [{"x": x[i].tolist(), "labels": float(y[i])} for i in range(n)]


def _installed(name: str) -> bool:
    library = SUPPORT[OptimizerNames(name)]["torch"].library
    return library is None or importlib.util.find_spec(MODULES.get(library, library)) is not None


def _transformers_run(model, data, name, tmp_path, steps=STEPS, **kw):
    """The optimizer and schedule transformers' Trainer would build, stepped as its loop steps them."""
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(str(tmp_path / "hf"), **{**BASE, **kw, "optim": name, "max_steps": steps})
    cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    groups = [{"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": args.weight_decay},
              {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0}]
    for own in ("params", "model", "optimizer_dict"):
        if own in kwargs:
            groups = kwargs.pop(own)
    optimizer = cls(groups, **kwargs)
    schedule = dict(num_warmup_steps=args.get_warmup_steps(steps), num_training_steps=steps)
    if hasattr(optimizer, "optimizer_dict"):
        # What transformers' get_scheduler does for a layer-wise optimizer, short of building its
        # LayerWiseDummyScheduler, which torch >= 2.13 refuses (xtrainer has its own).
        per_param = {p: transformers.get_scheduler(args.lr_scheduler_type, o, **schedule)
                     for p, o in optimizer.optimizer_dict.items()}
        for param in per_param:
            param.register_post_accumulate_grad_hook(lambda p: per_param[p].step())
        scheduler = None
    else:
        scheduler = transformers.get_scheduler(args.lr_scheduler_type, optimizer, **schedule)
    lomo = name in ("lomo", "adalomo")
    for start in range(0, len(data), 4):
        batch = data[start:start + 4]
        model.train()
        if hasattr(optimizer, "train"):
            optimizer.train()
        loss = model(torch.tensor([r["x"] for r in batch]), torch.tensor([r["labels"] for r in batch]))[0]
        if lomo:
            optimizer.fused_backward(loss, scheduler.get_last_lr()[0])
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        model.zero_grad()
    return model


def _xtrainer_run(model, data, tmp_path, **kw):
    trainer = xtrainer.Trainer(model=model, args=xtrainer.TrainingArguments(str(tmp_path / "x"), **{**BASE, **kw}),
                               train_dataset=data)
    trainer.train()
    return trainer


# torchao's optimizers compile their update with torch.compile (about a minute on CPU): slow tests.
SLOW = {"adamw_torch_4bit", "adamw_torch_8bit"}
CPU_NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
             for n in supported_optimizers("torch", "cpu") if n not in ("adamw", "lion")]
# RAdam leaves the weights alone while its variance estimate is not yet rectifiable (its first steps).
LONGER = {"schedule_free_radam": 6}


@pytest.mark.parametrize("name", CPU_NAMES)
def test_optimizer_trains_as_transformers_runs_it(tmp_path, name):
    if not _installed(name):
        pytest.skip("library not installed in this lane")
    kw = {}
    if SUPPORT[OptimizerNames(name)]["torch"].library in ("galore-torch", "apollo-torch"):
        kw = dict(optim_target_modules=["hidden"], optim_args="rank=4,update_proj_gap=2")
    if name == "galore_adafactor_layerwise":
        pytest.skip("transformers cannot build it (test_optimizers.py::test_galore_adafactor_layerwise_builds)")
    steps = LONGER.get(name, STEPS)
    start = Net()
    data = rows(4 * steps)
    torch.manual_seed(42)  # the Trainer's seed: APOLLO draws its projections from the global generator
    expected = _transformers_run(copy.deepcopy(start), data, name, tmp_path, steps, **kw)
    trainer = _xtrainer_run(copy.deepcopy(start), data, tmp_path, optim=name, max_steps=steps, **kw)
    got = dict(trainer.model.named_parameters())
    moved = max((got[n] - p).abs().max().item() for n, p in start.named_parameters())
    assert moved > 1e-4, "the weights did not change"
    for n, p in expected.named_parameters():
        torch.testing.assert_close(got[n], p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {n}: {m}")


def test_layerwise_and_lomo_refuse_what_they_cannot_do(tmp_path):
    pytest.importorskip("galore_torch")
    args = lambda **kw: xtrainer.TrainingArguments(str(tmp_path), **{**BASE, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="does not support gradient accumulation"):
        xtrainer.Trainer(model=Net(), args=args(optim="galore_adamw_layerwise", optim_target_modules=["hidden"],
                                                gradient_accumulation_steps=2))
    with pytest.raises(ValueError, match="nan_policy='skip' could not skip"):
        xtrainer.Trainer(model=Net(), args=args(optim="lomo", nan_policy="skip"))


def test_cuda_only_and_other_backend_values_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"optim='galore_adamw_8bit' cannot run on backend='torch' on cpu.*galore_adamw"):
        xtrainer.Trainer(model=Net(), args=xtrainer.TrainingArguments(str(tmp_path), optim="galore_adamw_8bit",
                                                                      report_to="none"))
    with pytest.raises(ValueError, match=r"optim='adamw_torch_xla' cannot run on backend='torch'.*'torch_xla'"):
        xtrainer.Trainer(model=Net(), args=xtrainer.TrainingArguments(str(tmp_path), optim="adamw_torch_xla",
                                                                      report_to="none"))
    # A user optimizer makes args.optim irrelevant, as in transformers.
    model = Net()
    xtrainer.Trainer(model=model, args=xtrainer.TrainingArguments(str(tmp_path), optim="adamw_torch_xla",
                                                                  report_to="none"),
                     optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))


def test_optimizer_cls_and_kwargs(tmp_path):
    start, data = Net(), rows()
    trainer = xtrainer.Trainer(model=copy.deepcopy(start), args=xtrainer.TrainingArguments(str(tmp_path), **BASE),
                               train_dataset=data,
                               optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}))
    assert trainer.optimizer_cls_and_kwargs[0] is torch.optim.SGD
    trainer.train()
    optimizer = trainer.optimizer
    assert type(optimizer) is torch.optim.SGD
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # transformers' decay groups
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["lr"] == 0.05
    assert [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h] == pytest.approx(
        [0.0, 0.05, 0.025])  # the kwargs' lr is the peak the schedule scales
    with pytest.raises(RuntimeError, match="not both"):
        model = Net()
        xtrainer.Trainer(model=model, args=xtrainer.TrainingArguments(str(tmp_path), report_to="none"),
                         optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
                         optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}))


def _eval_args(tmp_path, **kw):
    return xtrainer.TrainingArguments(str(tmp_path), **{**BASE, "eval_strategy": "steps", "eval_steps": 1,
                                                        "max_steps": 6, **kw})


def test_user_reduce_lr_on_plateau_is_stepped_with_the_eval_metric(tmp_path):
    model, data = Net(), rows(24)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # Only the first evaluation counts as an improvement (threshold 1e9), so every second one after it halves the lr.
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1, threshold_mode="abs",
                                                         threshold=1e9)
    trainer = xtrainer.Trainer(model=model, args=_eval_args(tmp_path, metric_for_best_model="eval_loss"),
                               train_dataset=data, eval_dataset=data[:8], optimizers=(optimizer, plateau))
    trainer.train()  # crashed before: the train step called plateau.step() without a metric
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.025])
    assert trainer.lr_scheduler is plateau


def test_metric_driven_scheduler_that_no_metric_reaches_is_refused(tmp_path):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    with pytest.raises(ValueError, match="eval_strategy='no' never evaluates"):
        xtrainer.Trainer(model=model, args=xtrainer.TrainingArguments(str(tmp_path), report_to="none"),
                         optimizers=(optimizer, plateau))
    with pytest.raises(ValueError, match="set metric_for_best_model"):
        xtrainer.Trainer(model=model, args=_eval_args(tmp_path), eval_dataset=rows(4), optimizers=(optimizer, plateau))
    trainer = xtrainer.Trainer(model=model, args=_eval_args(tmp_path, metric_for_best_model="accuracy"),
                               train_dataset=rows(24), eval_dataset=rows(4), optimizers=(optimizer, plateau))
    with pytest.raises(KeyError, match="metric_for_best_model='eval_accuracy'"):
        trainer.train()


def test_greedy_follows_the_eval_loss(tmp_path):
    from xtrainer.schedules import greedy_init, greedy_update

    kwargs = {"patience": 0, "factor": 0.5, "min_lr": 1e-3, "max_lr": 0.2}
    args = _eval_args(tmp_path, lr_scheduler_type="greedy", lr_scheduler_kwargs=kwargs, learning_rate=0.05)
    data = rows(24)
    trainer = xtrainer.Trainer(model=Net(), args=args, train_dataset=data, eval_dataset=data[:8])
    trainer.train()
    history = trainer.state.log_history
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    lrs = [h["learning_rate"] for h in history if "learning_rate" in h]
    state, expected = greedy_init(0.05, kwargs), [0.05]
    for loss in evals[:-1]:
        state = greedy_update(state, loss)
        expected.append(state.lr)
    assert lrs == pytest.approx(expected)
    assert len(set(lrs)) > 1
    assert isinstance(trainer.lr_scheduler, transformers_optimization().GreedyLR)  # the class transformers builds


def transformers_optimization():
    return pytest.importorskip("transformers.optimization")


@pytest.mark.parametrize("kind", ["reduce_lr_on_plateau", "greedy"])
def test_metric_driven_types_are_transformers_classes_and_resume(tmp_path, kind):
    scheduler_cls = {"reduce_lr_on_plateau": torch.optim.lr_scheduler.ReduceLROnPlateau,
                     "greedy": transformers_optimization().GreedyLR}[kind]
    kwargs = {"patience": 0, "factor": 0.5}
    if kind == "reduce_lr_on_plateau":
        kwargs.update(threshold_mode="abs", threshold=1e9)  # every evaluation after the first is "worse"
    data = rows(24)

    args = _eval_args(tmp_path, lr_scheduler_type=kind, lr_scheduler_kwargs=kwargs, metric_for_best_model="eval_loss",
                      save_strategy="steps", save_steps=3)
    full = xtrainer.Trainer(model=Net(), args=args, train_dataset=data, eval_dataset=data[:8])
    full.train()
    assert isinstance(full.lr_scheduler, scheduler_cls) and full.lr_scheduler.patience == 0
    lrs = [h["learning_rate"] for h in full.state.log_history if "learning_rate" in h]
    assert len(set(lrs)) > 1  # the evaluation metric moved it
    resumed = xtrainer.Trainer(model=Net(), args=args, train_dataset=data, eval_dataset=data[:8])
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))  # scheduler.pt restores its state
    tail = [h["learning_rate"] for h in resumed.state.log_history if "learning_rate" in h and h["step"] > 3]
    assert tail == pytest.approx(lrs[3:])


def test_metric_driven_scheduler_state_round_trips(tmp_path):
    from xtrainer.backends.torch.schedulers import MetricDrivenScheduler
    from xtrainer.schedules import greedy_init, plateau_init

    for state in (greedy_init(0.1, {"patience": 0, "smooth": True, "window_size": 2}), plateau_init(0.1)):
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = MetricDrivenScheduler(optimizer, state)
        for metric in (1.0, 2.0, 3.0):
            scheduler.step(metric)
        path = tmp_path / "scheduler.pt"
        torch.save(scheduler.state_dict(), path)
        fresh = MetricDrivenScheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), state)
        fresh.load_state_dict(torch.load(path, weights_only=True))
        assert fresh.metric_state == scheduler.metric_state
    with pytest.raises(ValueError, match="lr_scheduler_type the checkpoint was written with"):
        MetricDrivenScheduler(optimizer, plateau_init(0.1)).load_state_dict(
            MetricDrivenScheduler(optimizer, greedy_init(0.1)).state_dict())
