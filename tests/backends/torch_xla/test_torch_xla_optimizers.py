"""backend="torch_xla": every `optim` value it runs, against the torch backend on the same data (the same library
optimizer, or for bitsandbytes' 32-bit Lion xtrainer's plain-torch Lion); metric-driven user schedulers; refusals.

Runs in the XLA lane only (skipped where torch_xla is not installed).
"""

from __future__ import annotations

import copy
import importlib.util

import pytest

torch_xla = pytest.importorskip("torch_xla")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import xtrainer  # noqa: E402
from xtrainer.optimizers import SUPPORT, supported_optimizers  # noqa: E402
from xtrainer.trainer_utils import OptimizerNames  # noqa: E402

BASE = dict(logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=1, max_grad_norm=0.0,
            train_sampling_strategy="sequential", learning_rate=1e-2, weight_decay=0.1, warmup_steps=1)
MODULES = {"galore-torch": "galore_torch", "torch-optimi": "optimi"}
# The torch-backend run each one is compared with: syncfree AdamW is AdamW's update.
REFERENCE = {"adamw_torch_xla": "adamw_torch"}
STEPS = {"schedule_free_radam": 6}  # RAdam leaves the weights alone for its first steps
# GaLore's SVD makes its graphs slow to compile on the CPU device; GrokAdamW's and StableAdamW's updates trace into
# large graphs too (12-15 s each on a loaded CI machine). The default suite keeps the plainer ones.
SLOW = {"galore_adamw", "galore_adafactor", "galore_adamw_layerwise", "galore_adafactor_layerwise", "grokadamw",
        "stable_adamw"}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 1)

    def forward(self, x, labels=None):
        y = self.head(self.norm(torch.relu(self.inp(x)))).squeeze(-1)
        return (nn.functional.mse_loss(y, labels), y) if labels is not None else (y,)


def rows(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return [{"x": x[i].tolist(), "labels": float(x[i].sum() * 0.5)} for i in range(n)]


def _run(backend, model, data, tmp_path, **kw):
    per_device = 2 if backend == "torch_xla" else 8  # a global batch of 8 on the 4 CPU devices, and on torch
    args = xtrainer.TrainingArguments(str(tmp_path / backend), backend=backend, per_device_train_batch_size=per_device,
                                      per_device_eval_batch_size=per_device, **{**BASE, **kw})
    trainer = xtrainer.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8])
    trainer.train()
    return trainer


def _installed(name: str) -> bool:
    library = SUPPORT[OptimizerNames(name)]["torch_xla"].library
    return library is None or importlib.util.find_spec(MODULES.get(library, library)) is not None


NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
         for n in supported_optimizers("torch_xla") if n not in ("adamw", "lion")]


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_matches_the_torch_backend(tmp_path, name):
    if not _installed(name):
        pytest.skip("library not installed in this lane")
    kw = dict(optim_target_modules=["inp"], optim_args="rank=2,update_proj_gap=2") if name.startswith("galore") else {}
    steps = STEPS.get(name, 3)
    start, data = Net(), rows(8 * steps)
    ref = _run("torch", copy.deepcopy(start), data, tmp_path, optim=REFERENCE.get(name, name), max_steps=steps, **kw)
    xla = _run("torch_xla", copy.deepcopy(start), data, tmp_path, optim=name, max_steps=steps, **kw)
    expected, got = ref.model.state_dict(), {k: v.cpu() for k, v in xla.model.state_dict().items()}
    assert max((expected[k] - v).abs().max().item() for k, v in start.state_dict().items()) > 1e-4
    # GaLore-AdamW's first Adam steps normalise projected gradient entries near zero, where the SVDs of XLA and
    # of the CPU differ by rounding: the same update up to those entries.
    atol = 3e-3 if name.startswith("galore_adamw") else 2e-5
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=atol, msg=lambda m: f"{name} {key}: {m}")


def test_user_reduce_lr_on_plateau_is_stepped_with_the_eval_metric(tmp_path):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # Only the first evaluation counts as an improvement, so every second one after it halves the lr.
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1, threshold_mode="abs",
                                                         threshold=1e9)
    args = xtrainer.TrainingArguments(str(tmp_path), backend="torch_xla", per_device_train_batch_size=2,
                                      per_device_eval_batch_size=2, eval_strategy="steps", eval_steps=1, max_steps=5,
                                      metric_for_best_model="loss", **BASE)
    data = rows(40)
    trainer = xtrainer.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8],
                               optimizers=(optimizer, plateau))
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05])


def test_values_it_cannot_run_fail_at_construction(tmp_path):
    for name, needle in (("apollo_adamw", "torch.Generator"), ("adamw_bnb_8bit", "torch_xla cannot trace"),
                         ("lomo", "inside the backward pass")):
        args = xtrainer.TrainingArguments(str(tmp_path), backend="torch_xla", optim=name, report_to="none")
        with pytest.raises(ValueError, match=rf"optim='{name}' cannot run on backend='torch_xla': .*{needle}"):
            xtrainer.Trainer(model=Net(), args=args)
