"""`report_to="kubeflow"`: training progress for a Kubeflow TrainJob's status.

Inside a TrainJob with runtime status enabled, the controller injects KUBEFLOW_TRAINER_SERVER_URL
(where to POST), KUBEFLOW_TRAINER_SERVER_TOKEN (a file holding the bearer token) and optionally
KUBEFLOW_TRAINER_SERVER_CA_CERT (the CA file of its TLS certificate). TrainingArguments then adds
"kubeflow" to report_to by itself, as transformers does (DISABLE_KUBEFLOW_INTEGRATION=TRUE stops it).

Process 0 posts {"trainerStatus": {...}} with the progress percentage (99 at most until the end),
the estimated seconds left and the latest numeric logs, at most once every 5 seconds except at the
start and the end. A failed post is logged at debug level and never stops training.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import ssl
import time
import urllib.request

from ..callbacks import TrainerCallback

logger = logging.getLogger(__name__)

ENV_URL = "KUBEFLOW_TRAINER_SERVER_URL"
ENV_TOKEN = "KUBEFLOW_TRAINER_SERVER_TOKEN"
ENV_CA = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
ENV_DISABLE = "DISABLE_KUBEFLOW_INTEGRATION"


def requested() -> bool:
    """Whether this process runs in a TrainJob that asks for progress (and the integration is not disabled)."""
    if os.environ.get(ENV_DISABLE, "").upper() == "TRUE":
        return False
    return os.environ.get(ENV_URL) is not None


class KubeflowCallback(TrainerCallback):
    """Posts training progress to the Kubeflow Trainer controller (see the module docstring)."""

    min_interval_s = 5.0

    def __init__(self):
        if not requested():
            raise RuntimeError(f"report_to='kubeflow' needs {ENV_URL} (set by Kubeflow inside a TrainJob).")
        self._metrics: dict[str, float] = {}
        self._start = None
        self._last_post = float("-inf")

    def _post(self, status: dict, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._last_post < self.min_interval_s:
            return False
        self._last_post = now
        try:
            token_file = os.environ.get(ENV_TOKEN)
            if not token_file or not os.path.exists(token_file):
                return False
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
            ca_file = os.environ.get(ENV_CA)
            context = ssl.create_default_context(cafile=ca_file) if ca_file else None
            status = {"lastUpdatedTime": datetime.datetime.now(datetime.timezone.utc).isoformat(), **status}
            request = urllib.request.Request(
                os.environ[ENV_URL],
                data=json.dumps({"trainerStatus": status}).encode(),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=5, context=context) as response:
                return response.status == 200
        except Exception as exc:  # progress reports must never stop training
            logger.debug("Kubeflow progress report failed: %s", exc)
            return False

    @staticmethod
    def _metric_list(metrics: dict) -> list[dict]:
        return [{"name": str(k), "value": str(v)} for k, v in metrics.items()]

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._start, self._metrics = time.time(), {}
        status = {"progressPercentage": 0}
        if state.max_steps:
            status["metrics"] = self._metric_list({"total_steps": state.max_steps})
        self._post(status, force=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self._metrics.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not state.max_steps or self._start is None:
            return
        done = state.global_step / state.max_steps
        elapsed = time.time() - self._start
        metrics = {**self._metrics, "current_step": state.global_step, "total_steps": state.max_steps}
        if state.epoch is not None:
            metrics["current_epoch"] = round(state.epoch, 2)
        status = {"progressPercentage": min(int(done * 100), 99), "metrics": self._metric_list(metrics)}
        if state.global_step > 0:
            status["estimatedRemainingSeconds"] = int(elapsed / state.global_step * (state.max_steps - state.global_step))
        self._post(status)

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self._start is None:
            return
        self._post({"progressPercentage": 100, "estimatedRemainingSeconds": 0,
                    "metrics": self._metric_list(self._metrics)}, force=True)
