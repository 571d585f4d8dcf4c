"""One process of a multi-host JAX run on localhost (used by test_multihost.py).

argv: output_dir, devices_per_process, per_device_batch, resume (0/1). The coordinator address,
process count and id come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
(none for a single-process reference run).
"""

import json
import logging
import os
import sys
import time

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[2]}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # tests/: jax_models

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import xtrainer  # noqa: E402
from jax_models import RegressionMLP, regression_rows  # noqa: E402


class LoggedRows:
    """regression_rows that append each index they are asked for to <log_dir>/fetched-<process>-<pid>.txt."""

    def __init__(self, rows, log_dir):
        self.rows, self.log_dir = rows, log_dir

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        name = f"fetched-{os.environ.get('JAX_PROCESS_ID', '0')}-{os.getpid()}.txt"
        with open(os.path.join(self.log_dir, name), "a") as f:
            f.write(f"{int(i)}\n")
        return self.rows[i]


def main():
    output_dir, per_device, resume = sys.argv[1], int(sys.argv[3]), sys.argv[4] == "1"
    # Optional (test_multihost's data test): worker processes, random order, and a log of the fetched indices.
    workers, fetch_log = int(os.environ.get("MH_WORKERS", "0")), os.environ.get("MH_FETCH_LOG")
    args = xtrainer.TrainingArguments(
        output_dir, backend="jax", per_device_train_batch_size=per_device, max_steps=6, save_steps=3, logging_steps=1,
        learning_rate=0.02, report_to="none", disable_tqdm=True,
        train_sampling_strategy="random" if fetch_log else "sequential", dataloader_num_workers=workers,
        log_level="error", log_level_replica="info", log_on_each_node=False,
    )
    # main_process_first(local=False) is a barrier across hosts: process 1 enters after process 0 left.
    marker = output_dir.rstrip("/") + ".first"
    with args.main_process_first(local=False, desc="preprocessing"):
        if jax.process_index() == 0:
            time.sleep(0.5)
            open(marker, "w").close()
        saw_marker = os.path.exists(marker)
    rows = regression_rows(64)
    trainer = xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), args=args,
                               train_dataset=LoggedRows(rows, fetch_log) if fetch_log else rows)
    with open(output_dir.rstrip("/") + f".process{jax.process_index()}.json", "w") as f:
        json.dump({"saw_marker": saw_marker, "level": logging.getLogger("xtrainer").level,
                   "should_log": args.should_log, "should_save": args.should_save}, f)
    trainer.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-3") if resume else None)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    params = [np.asarray(x).tolist() for x in jax.tree.leaves(jax.device_get(nnx.state(trainer.model, nnx.Param)))
              if getattr(x, "is_fully_addressable", True)]
    if jax.process_index() == 0:
        print("RESULT=" + json.dumps({"losses": losses, "processes": jax.process_count(), "devices": jax.device_count(),
                                      "params": params}))


if __name__ == "__main__":
    main()
