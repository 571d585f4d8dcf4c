"""main_process_first, log_on_each_node and save_on_each_node in a real two-process torch run: two nodes of one
process each on localhost, each node with an output_dir of its own (its "local disk")."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh processes importing torch: ~15-30 s on two busy cores
@pytest.mark.distributed
def test_two_torch_nodes(tmp_path):
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(HERE)]))
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "two_node_worker.py"), str(tmp_path)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    first, second = (json.loads((tmp_path / f"result-{r}.json").read_text()) for r in range(2))
    assert second["saw_marker"]  # main_process_first(local=False): process 1 waited for process 0's block
    # log_on_each_node=False: only the run's first process logs at log_level, the other node at log_level_replica.
    assert (first["level"], second["level"]) == (logging.ERROR, logging.INFO)
    assert first["should_log"] and not second["should_log"]
    # save_on_each_node: each node's first process wrote a whole checkpoint into its own output_dir.
    assert first["should_save"] and second["should_save"]
    for result in (first, second):
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                "training_args.bin"} <= set(result["files"]), result["files"]
    assert "rng_state_0.pth" in first["files"] and "rng_state_1.pth" in second["files"]
    assert first["weights"] == second["weights"]
