"""One process of a two-node torch run on localhost (tests/args/test_two_nodes.py).

argv: base directory. Each process plays a node of its own (LOCAL_RANK=0, LOCAL_WORLD_SIZE=1) whose local disk
is `<base>/node<rank>`; it trains two steps, saves at step 2, and writes what it saw to `<base>/result-<rank>.json`.
"""

import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: helpers

import xtrainer  # noqa: E402
from helpers import RegressionModel, regression_data  # noqa: E402


def main():
    base = sys.argv[1]
    rank = int(os.environ["RANK"])
    args = xtrainer.TrainingArguments(
        os.path.join(base, f"node{rank}"), backend="torch", save_on_each_node=True, log_level="error",
        log_level_replica="info", log_on_each_node=False, max_steps=2, save_strategy="steps", save_steps=2,
        per_device_train_batch_size=2, report_to="none", disable_tqdm=True, use_cpu=True,
    )
    marker = os.path.join(base, "main-went-first")
    # Before any Trainer exists: main_process_first joins the process group itself, as in transformers.
    with args.main_process_first(local=False, desc="preprocessing"):
        if rank == 0:
            time.sleep(1.0)
            open(marker, "w").close()
        saw_marker = os.path.exists(marker)
    trainer = xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=regression_data(16))
    trainer.train()
    checkpoint = os.path.join(args.output_dir, "checkpoint-2")
    result = {
        "saw_marker": saw_marker,
        "level": logging.getLogger("xtrainer").level,
        "should_save": args.should_save,
        "should_log": args.should_log,
        "files": sorted(os.listdir(checkpoint)) if os.path.isdir(checkpoint) else [],
        "weights": [p.detach().numpy().tolist() for p in trainer.model.parameters()],
    }
    with open(os.path.join(base, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
