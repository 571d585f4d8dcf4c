"""Safe loading: torch state is read with weights_only=True; no pickle from a checkpoint runs by default."""

import os
import re

import pytest
import torch

import xtrainer
from helpers import RegressionModel, regression_data
from xtrainer.backends.torch import state_io
from xtrainer.manifest import write_manifest

ARGS = dict(per_device_train_batch_size=4, learning_rate=0.05, save_steps=2, logging_steps=1, report_to="none",
            disable_tqdm=True, seed=3, backend="torch")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Payload:
    """Unpickling it runs code: it writes a marker file (what an attacker's pickle would do worse)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _trainer(out, **overrides):
    args = xtrainer.TrainingArguments(str(out), **{**ARGS, "max_steps": 2, **overrides})
    return xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=regression_data(16))


def _plant(checkpoint, marker):
    """Adds a code-running object to rng_state.pth and replaces training_args.bin, then re-signs the manifest
    (a valid manifest proves integrity, not safety)."""
    rng = torch.load(checkpoint / "rng_state.pth", weights_only=False)
    rng["extra"] = Payload(marker)
    torch.save(rng, checkpoint / "rng_state.pth")
    torch.save(Payload(marker), checkpoint / "training_args.bin")
    write_manifest(str(checkpoint))


def test_malicious_pickle_is_refused_by_default(tmp_path):
    out, marker = tmp_path / "run", str(tmp_path / "marker")
    _trainer(out).train()
    _plant(out / "checkpoint-2", marker)
    trainer = _trainer(out, max_steps=4)
    with pytest.raises(state_io.UnsafeCheckpointError) as info:
        trainer.train(resume_from_checkpoint=True)
    message = str(info.value)
    assert str(out / "checkpoint-2" / "rng_state.pth") in message
    assert "allow_unsafe_checkpoint_load=True" in message
    assert info.value.path == str(out / "checkpoint-2" / "rng_state.pth")
    assert not os.path.exists(marker)  # neither rng_state.pth's payload nor training_args.bin ran


def test_opt_in_unpickles_fully(tmp_path):
    out, marker = tmp_path / "run", str(tmp_path / "marker")
    _trainer(out).train()
    _plant(out / "checkpoint-2", marker)
    trainer = _trainer(out, max_steps=4, allow_unsafe_checkpoint_load=True)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4
    assert open(marker).read() == "pwned"  # the opt-in really unpickles (that is why it is opt-in)


def test_legacy_weights_bin_is_loaded_safely(tmp_path):
    model = RegressionModel(a=1.5, b=-2.0)
    good = tmp_path / "good"
    good.mkdir()
    torch.save(model.state_dict(), good / state_io.LEGACY_WEIGHTS_NAME)
    torch.testing.assert_close(state_io.read_weights(str(good))["a"], torch.tensor(1.5))

    bad, marker = tmp_path / "bad", str(tmp_path / "marker")
    bad.mkdir()
    torch.save({"a": torch.tensor(1.0), "b": Payload(marker)}, bad / state_io.LEGACY_WEIGHTS_NAME)
    with pytest.raises(state_io.UnsafeCheckpointError, match=r"pytorch_model\.bin.*allow_unsafe_checkpoint_load"):
        state_io.read_weights(str(bad))
    assert not os.path.exists(marker)


def test_corrupt_file_is_reported_as_corrupt_not_unsafe(tmp_path):
    path = tmp_path / "optimizer.pt"
    torch.save({"state": {}, "param_groups": []}, path)
    with open(path, "r+b") as f:
        f.truncate(30)
    with pytest.raises(ValueError, match=r"Cannot read .*optimizer\.pt \(truncated or corrupt\?\)") as info:
        state_io._load(str(path))
    assert not isinstance(info.value, state_io.UnsafeCheckpointError)


def test_every_torch_load_in_xtrainer_is_weights_only():
    """A static guard: a new torch.load without weights_only=True would unpickle checkpoints unchecked."""
    calls = []
    for dirpath, _, names in os.walk(os.path.join(ROOT, "xtrainer")):
        for name in names:
            if name.endswith(".py"):
                source = open(os.path.join(dirpath, name)).read()
                calls += [(name, m.group(0)) for m in re.finditer(r"torch\.load\([^)]*\)", source)]
    assert calls, "expected the torch state loader's calls"
    unsafe = [c for c in calls if "weights_only=True" not in c[1]]
    # The only full unpickling is the explicit opt-in path in state_io._load.
    assert [c[0] for c in unsafe] == ["state_io.py"] and "weights_only=False" in unsafe[0][1]
    source = open(os.path.join(ROOT, "xtrainer", "backends", "torch", "state_io.py")).read()
    opt_in = source[source.index("def _load("):source.index("def _numpy_safe_globals")]
    assert opt_in.index("if not allow_unsafe:") < opt_in.index("location, weights_only=False)")
