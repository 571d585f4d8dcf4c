"""report_to="kubeflow": progress of the run posted to the Kubeflow Trainer controller.

Inside a Kubeflow TrainJob (with its runtime-status feature) the controller injects
KUBEFLOW_TRAINER_SERVER_URL, and TrainingArguments then adds "kubeflow" to report_to by itself, as
transformers does (DISABLE_KUBEFLOW_INTEGRATION=true turns that off). The main process posts
`{"trainerStatus": {...}}` (progress percentage, estimated seconds left, the latest numeric logs) with the
service-account token from KUBEFLOW_TRAINER_SERVER_TOKEN, at most every 5 seconds, and at the start and
end of training. A failed post is logged at debug level and never stops training: status reporting must
not cost a run.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
import urllib.request
from datetime import datetime, timezone

from ..callbacks import TrainerCallback

logger = logging.getLogger(__name__)

SERVER_URL = "KUBEFLOW_TRAINER_SERVER_URL"
CA_CERT = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
TOKEN_PATH = "KUBEFLOW_TRAINER_SERVER_TOKEN"
MIN_INTERVAL_SECONDS = 5.0


def kubeflow_requested() -> bool:
    """Whether this process runs in a Kubeflow TrainJob that asks for status (and it is not disabled)."""
    if os.environ.get("DISABLE_KUBEFLOW_INTEGRATION", "false").lower() == "true":
        return False
    return os.environ.get(SERVER_URL) is not None


class KubeflowCallback(TrainerCallback):
    """Posts the run's progress to the Kubeflow Trainer controller (see the module docstring)."""

    def __init__(self):
        if not kubeflow_requested():
            raise RuntimeError(f"report_to='kubeflow' needs the {SERVER_URL} environment variable (set by Kubeflow).")
        self._metrics: dict = {}
        self._start: float | None = None
        self._last_post = float("-inf")

    def _context(self):
        ca_file = os.environ.get(CA_CERT)
        return ssl.create_default_context(cafile=ca_file) if ca_file else None

    def _token(self) -> str | None:
        path = os.environ.get(TOKEN_PATH)
        if not path or not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read().strip()

    def _post(self, progress: int | None, remaining: float | None, metrics: dict | None, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._last_post < MIN_INTERVAL_SECONDS:
            return False
        self._last_post = now
        try:
            token = self._token()
            if token is None:
                return False
            status = {"lastUpdatedTime": datetime.now(timezone.utc).isoformat()}
            if progress is not None:
                status["progressPercentage"] = max(0, min(100, int(progress)))
            if remaining is not None:
                status["estimatedRemainingSeconds"] = max(0, int(remaining))
            if metrics:
                status["metrics"] = [{"name": str(k), "value": str(v)} for k, v in metrics.items()]
            request = urllib.request.Request(
                os.environ[SERVER_URL], data=json.dumps({"trainerStatus": status}).encode(),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}, method="POST",
            )
            with urllib.request.urlopen(request, timeout=5, context=self._context()) as response:
                return response.status == 200
        except Exception as exc:  # the controller being unreachable must not stop training
            logger.debug("Kubeflow status update failed: %s", exc)
            return False

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._start, self._metrics = time.time(), {}
            self._post(0, None, {"total_steps": state.max_steps} if state.max_steps else None, force=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self._metrics.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self._start is None or not state.max_steps:
            return
        remaining = None
        if state.global_step:
            remaining = (time.time() - self._start) / state.global_step * (state.max_steps - state.global_step)
        metrics = {**self._metrics, "current_step": state.global_step, "total_steps": state.max_steps}
        if state.epoch is not None:
            metrics["current_epoch"] = round(state.epoch, 2)
        # 100% is kept for on_train_end, which says the run is complete.
        self._post(min(99, state.global_step * 100 // state.max_steps), remaining, metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self._start is not None:
            self._post(100, 0, self._metrics, force=True)
