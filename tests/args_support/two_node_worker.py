"""One process of a two-node torch run on localhost (used by test_multiprocess_fields.py).

argv: base directory. Each process plays a node of its own (LOCAL_RANK=0, LOCAL_WORLD_SIZE=1) whose
local disk is `<base>/node<rank>`; it writes what it saw to `<base>/result-<rank>.json`.
"""

import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import xtrainer  # noqa: E402
from field_probes import rows, torch_probe  # noqa: E402


def main():
    base = sys.argv[1]
    rank = int(os.environ["RANK"])
    args = xtrainer.TrainingArguments(
        os.path.join(base, f"node{rank}"), backend="torch", save_on_each_node=True, log_level="error",
        log_level_replica="info", log_on_each_node=False, max_steps=2, save_strategy="steps", save_steps=2,
        per_device_train_batch_size=2, report_to="none", disable_tqdm=True, use_cpu=True,
    )
    marker = os.path.join(base, "main-went-first")
    with args.main_process_first(local=False, desc="preprocessing"):  # before any Trainer: joins the group itself
        if rank == 0:
            time.sleep(1.0)
            open(marker, "w").close()
        saw_marker = os.path.exists(marker)
    trainer = xtrainer.Trainer(model=torch_probe(), args=args, train_dataset=rows(16))
    trainer.train()
    checkpoint = os.path.join(args.output_dir, "checkpoint-2")
    result = {
        "saw_marker": saw_marker,
        "level": logging.getLogger("xtrainer").level,
        "should_save": args.should_save,
        "files": sorted(os.listdir(checkpoint)) if os.path.isdir(checkpoint) else [],
        "weight": trainer.model.linear.weight.detach().numpy().tolist(),
    }
    with open(os.path.join(base, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
