"""report_to="kubeflow": inside a Kubeflow TrainJob the run's progress is posted to the controller."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

import xtrainer
from helpers import RegressionModel, regression_data


@pytest.fixture
def controller(tmp_path, monkeypatch):
    """A stand-in Kubeflow controller on 127.0.0.1 that keeps every status post it receives."""
    posts = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            posts.append((self.headers["Authorization"], body["trainerStatus"]))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    monkeypatch.setenv("KUBEFLOW_TRAINER_SERVER_URL", f"http://127.0.0.1:{server.server_port}/status")
    monkeypatch.setenv("KUBEFLOW_TRAINER_SERVER_TOKEN", str(token))
    yield posts
    server.shutdown()


def test_progress_is_posted_inside_a_trainjob(tmp_path, controller):
    args = xtrainer.TrainingArguments(str(tmp_path), backend="torch", max_steps=6, logging_steps=1,
                                      per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True)
    assert args.report_to == ["kubeflow"]  # added by itself, as transformers does
    xtrainer.Trainer(model=RegressionModel(), args=args, train_dataset=regression_data(32)).train()
    assert all(auth == "Bearer secret-token" for auth, _ in controller)
    first, last = controller[0][1], controller[-1][1]
    assert first["progressPercentage"] == 0 and {"name": "total_steps", "value": "6"} in first["metrics"]
    assert last["progressPercentage"] == 100 and last["estimatedRemainingSeconds"] == 0
    assert {m["name"] for m in last["metrics"]} >= {"loss", "learning_rate", "train_loss"}
    # Steps in between are throttled to one post per 5 seconds: this short run posts only start and end.
    assert len(controller) == 2


def test_disabled_or_outside_a_trainjob(tmp_path, controller, monkeypatch):
    monkeypatch.setenv("DISABLE_KUBEFLOW_INTEGRATION", "true")
    assert xtrainer.TrainingArguments(str(tmp_path)).report_to == []
    monkeypatch.delenv("DISABLE_KUBEFLOW_INTEGRATION")
    monkeypatch.delenv("KUBEFLOW_TRAINER_SERVER_URL")
    assert xtrainer.TrainingArguments(str(tmp_path), report_to="jsonl").report_to == ["jsonl"]
    from xtrainer.integrations.kubeflow import KubeflowCallback

    with pytest.raises(RuntimeError, match="KUBEFLOW_TRAINER_SERVER_URL"):
        KubeflowCallback()
