"""A training job that tests/fault/test_sigterm.py stops with SIGTERM (and the models/data both share).

`python sigterm_worker.py <torch|jax> <output_dir>` trains for MAX_STEPS steps with a checkpoint
every SAVE_STEPS steps (so the schedule does not save at the step where SIGTERM arrives). At the
end of step PAUSE_STEP a callback writes `<output_dir>/ready` and waits until the test, having
sent SIGTERM, writes `<output_dir>/sent`: the signal therefore arrives during that step, and
the trainer must save that step's checkpoint and exit with code 143.

Multi-host JAX (JAX_COORDINATOR_ADDRESS etc. set): every process writes its own `ready-<i>` and
waits, so the test signals (one of them) once all of them are at that step.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

MAX_STEPS, SAVE_STEPS, PAUSE_STEP = 6, 5, 2
ARGS = dict(per_device_train_batch_size=2, learning_rate=0.05, max_steps=MAX_STEPS, save_steps=SAVE_STEPS,
            logging_steps=1, report_to="none", disable_tqdm=True, seed=5, train_sampling_strategy="random",
            enable_jit_checkpoint=True)  # transformers' switch for the SIGTERM checkpoint


def torch_model():
    import torch
    from torch import nn

    class DropoutMLP(nn.Module):
        """Dropout makes the resumed run depend on the restored RNG state."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 1))

        def forward(self, x, labels=None):
            y = self.net(x)[..., 0]
            return (nn.functional.mse_loss(y, labels), y) if labels is not None else (y,)

    return DropoutMLP()


def jax_model():
    from flax import nnx

    from jax_models import RegressionMLP

    return RegressionMLP(nnx.Rngs(0), dropout=0.2)


def rows(n: int = 32):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return [{"x": x[i], "labels": float(x[i].sum())} for i in range(n)]


def make_trainer(backend: str, output_dir: str, callbacks=()):
    import xtrainer

    args = xtrainer.TrainingArguments(output_dir, backend=backend, **ARGS)
    model = torch_model() if backend == "torch" else jax_model()
    return xtrainer.Trainer(model=model, args=args, train_dataset=rows(), callbacks=list(callbacks))


def weights(trainer, backend: str) -> list[np.ndarray]:
    """The trained weights as numpy arrays, in a fixed order."""
    if backend == "torch":
        return [v.detach().numpy().copy() for _, v in sorted(trainer.model.state_dict().items())]
    import jax
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(trainer.model, nnx.Param))]


def main():
    backend, output_dir = sys.argv[1], sys.argv[2]
    import xtrainer

    index = int(os.environ.get("JAX_PROCESS_ID", "0"))

    multi_host = bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))

    class PauseForSignal(xtrainer.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if multi_host and state.global_step > PAUSE_STEP:
                # JAX's notifier polls for SIGTERM about once a second: slow steps down so the
                # agreed stop step comes well before the end of training.
                time.sleep(1.0)
            if state.global_step != PAUSE_STEP:
                return
            open(os.path.join(output_dir, f"ready-{index}"), "w").close()
            deadline = time.time() + 120
            while not os.path.exists(os.path.join(output_dir, "sent")) and time.time() < deadline:
                time.sleep(0.01)  # the SIGTERM handler runs here, in the main thread

    os.makedirs(output_dir, exist_ok=True)
    trainer = make_trainer(backend, output_dir, [PauseForSignal()])
    trainer.train()
    print("FINISHED without preemption", flush=True)


if __name__ == "__main__":
    main()
