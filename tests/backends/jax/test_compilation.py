"""Compilation: first compile time logged, persistent compilation cache, recompilation warnings."""

import logging
import os
import subprocess
import sys

from flax import nnx

import xtrainer
from jax_models import RegressionMLP, regression_rows

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))

SCRIPT = """
import sys
sys.path.insert(0, {here!r})
from flax import nnx
import xtrainer
from jax_models import RegressionMLP, regression_rows
args = xtrainer.TrainingArguments({out!r}, backend="jax", per_device_train_batch_size=1, max_steps=2, save_strategy="no",
                                  report_to="none", disable_tqdm=True, jax_compilation_cache_dir={cache!r})
trainer = xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=args, train_dataset=regression_rows(16))
trainer.train()
print("COMPILE_SECONDS", trainer.backend.compile_seconds[0])
"""


def test_first_compile_time_is_logged(tmp_path, caplog):
    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax", per_device_train_batch_size=1, max_steps=2,
                                      save_strategy="no", report_to="none", disable_tqdm=True)
    trainer = xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=args, train_dataset=regression_rows(16))
    with caplog.at_level(logging.WARNING, logger="xtrainer.backends.jax.backend"):
        trainer.train()
    messages = [r.getMessage() for r in caplog.records if "compiled in" in r.getMessage()]
    assert len(messages) == 1 and "first compilation" in messages[0]
    assert len(trainer.backend.compile_seconds) == 1 and trainer.backend.compile_seconds[0] > 0


def test_persistent_compilation_cache_is_written_and_reused(tmp_path):
    cache = tmp_path / "cache"
    code = SCRIPT.format(here=os.path.dirname(os.path.dirname(HERE)), out=str(tmp_path / "out"), cache=str(cache))
    env = dict(os.environ, PYTHONPATH=ROOT)

    def run():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return float(out.stdout.split("COMPILE_SECONDS")[1].split()[0])

    first = run()
    entries = os.listdir(cache)
    assert entries, "the compilation cache directory stayed empty"
    second = run()
    assert sorted(os.listdir(cache)) == sorted(entries)  # the second run hit the cache instead of adding entries
    assert second > 0 and first > 0
