"""Trains the annotated MLP on one mesh and prints the loss curve as JSON (used by test_mesh.py).

Run as a script so the device count can differ from the test process: argv[1] is the fake CPU
device count, argv[2] the mesh as JSON, argv[3] the per-device batch size.
"""

import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[1]}"
sys.path.insert(0, os.path.dirname(__file__))  # test_mesh (AnnotatedMLP)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # tests/: jax_models

from flax import nnx  # noqa: E402

import xtrainer  # noqa: E402
from jax_models import regression_rows  # noqa: E402
from test_mesh import AnnotatedMLP  # noqa: E402


def main():
    args = xtrainer.TrainingArguments(
        tempfile.mkdtemp(), backend="jax", mesh=json.loads(sys.argv[2]), per_device_train_batch_size=int(sys.argv[3]),
        max_steps=8, logging_steps=1, learning_rate=0.02, save_strategy="no", report_to="none", disable_tqdm=True,
        train_sampling_strategy="sequential",
    )
    trainer = xtrainer.Trainer(model=AnnotatedMLP(nnx.Rngs(0)), args=args, train_dataset=regression_rows(64))
    trainer.train()
    print("LOSSES=" + json.dumps([h["loss"] for h in trainer.state.log_history if "loss" in h]))


if __name__ == "__main__":
    main()
