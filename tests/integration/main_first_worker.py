"""One process of a 2-process run testing TrainingArguments.main_process_first (test_process_attributes.py).

argv: backend (torch | jax), marker file, local (1: main process of each node first, 0: of the run). The main process sleeps inside the block and then writes the
marker; the other process must find the marker when it enters the block (it waited at the barrier).
Prints RESULT=<json> with what this process saw.
"""

import json
import os
import sys
import time

backend, marker, local = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if backend == "jax":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

import xtrainer  # noqa: E402

args = xtrainer.TrainingArguments(os.path.dirname(marker), backend=backend, report_to="none")
seen = {"world_size": args.world_size, "process_index": args.process_index, "should_save": args.should_save,
        "parallel_mode": args.parallel_mode.value}
with args.main_process_first(local=local, desc="marker"):
    if args.process_index == 0:
        time.sleep(2.0)
        with open(marker, "w") as f:
            f.write("main was first")
    else:
        seen["marker_found"] = os.path.exists(marker)
print("RESULT=" + json.dumps(seen), flush=True)
