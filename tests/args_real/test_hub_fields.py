"""push_to_hub and the hub_* fields, on every backend, against a local stand-in of the Hub (tests/fake_hub.py).

The Trainer talks to it through huggingface_hub's own client (HF_ENDPOINT points there); each test asserts
the repositories, commits, files and headers the server received. xtrainer/args_support.py names these tests
as the proof that the hub fields act.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket

import numpy as np
import pytest

import xtrainer
from fake_hub import USER, FakeHub, use_fake_hub
from helpers import RegressionModel

pytest.importorskip("huggingface_hub")
KINDS = ["torch", "jax", "torch_xla"]
# What each backend writes as "the model" into output_dir (and so pushes from there).
MODEL_FILE = {"torch": "model.safetensors", "jax": "flax_model.msgpack", "torch_xla": "model.safetensors"}


def _needs(kind: str) -> None:
    if kind == "jax" and importlib.util.find_spec("flax") is None:
        pytest.skip("flax is not installed")
    if kind == "torch_xla" and importlib.util.find_spec("torch_xla") is None:
        pytest.skip("torch_xla runs in the XLA lane")


def _model(kind: str):
    if kind == "jax":
        from flax import nnx

        from jax_models import RegressionMLP

        return RegressionMLP(nnx.Rngs(0))
    return RegressionModel(a=0.5, b=-0.5)


def _rows(n: int = 16) -> list[dict]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return [{"x": x[i], "input_x": float(x[i].sum()), "labels": float(x[i].sum())} for i in range(n)]


def _trainer(tmp_path, kind: str, name: str = "my-run", **kw) -> xtrainer.Trainer:
    _needs(kind)
    args = dict(backend=kind, per_device_train_batch_size=4 if kind == "torch" else 1, max_steps=4, logging_steps=1,
                save_strategy="no", report_to="none", disable_tqdm=True, remove_unused_columns=False,
                learning_rate=0.05, push_to_hub=True, hub_token="hf_test_token")
    args.update(kw)
    return xtrainer.Trainer(model=_model(kind), args=xtrainer.TrainingArguments(str(tmp_path / name), **args),
                            train_dataset=_rows())


@pytest.fixture
def hub(monkeypatch):
    with FakeHub() as server:
        use_fake_hub(monkeypatch, server)
        yield server


@pytest.mark.parametrize("kind", KINDS)
def test_push_to_hub_uploads_the_model_and_its_card(tmp_path, kind, hub):
    trainer = _trainer(tmp_path, kind, hub_strategy="end", save_strategy="steps", save_steps=2)
    assert trainer.hub_model_id == f"{USER}/my-run" and f"{USER}/my-run" in hub.repos  # created at Trainer(...)
    trainer.train()
    assert hub.commits == []  # hub_strategy="end": nothing is pushed during training
    info = trainer.push_to_hub(language="en")
    assert [c.summary for c in hub.commits] == ["End of training"]
    commit = hub.commits[0]
    assert info.oid == commit.oid
    files = commit.files
    output_dir = trainer.args.output_dir
    for name in (MODEL_FILE[kind], "training_args.bin", "README.md"):
        with open(os.path.join(output_dir, name), "rb") as f:
            assert files[name] == f.read(), name  # the bytes on disk arrived
    card = files["README.md"].decode()
    assert "generated_from_trainer" in card and "- learning_rate: 0.05" in card and "language:\n- en" in card
    assert not any(p.startswith(("checkpoint-", "tmp-checkpoint-", "_")) for p in files)
    assert {a for a in hub.authorizations if a} == {"Bearer hf_test_token"}


@pytest.mark.parametrize("kind", KINDS)
def test_hub_strategy_every_save(tmp_path, kind, hub):
    trainer = _trainer(tmp_path, kind, save_strategy="steps", save_steps=2, hub_always_push=True)
    trainer.train()  # returns once the last push is done
    assert [c.summary for c in hub.commits] == ["Training in progress, step 2", "Training in progress, step 4"]
    for commit in hub.commits:
        assert MODEL_FILE[kind] in commit.files and "training_args.bin" in commit.files
        assert not any("checkpoint" in path for path in commit.files)
    with open(os.path.join(trainer.args.output_dir, "checkpoint-4", MODEL_FILE[kind]) if kind != "jax"
              else os.path.join(trainer.args.output_dir, MODEL_FILE[kind]), "rb") as f:
        assert hub.commits[-1].files[MODEL_FILE[kind]] == f.read()  # the last checkpoint's weights


@pytest.mark.parametrize("kind", ["torch", "torch_xla"])  # jax's checkpoint pushes: test_hub_strategy_every_save
@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints"])
def test_hub_strategy_checkpoints(tmp_path, kind, strategy, hub):
    trainer = _trainer(tmp_path, kind, save_strategy="steps", save_steps=2, hub_always_push=True, hub_strategy=strategy)
    trainer.train()
    summaries = [c.summary for c in hub.commits]
    assert summaries == ["Training in progress, step 2", "Training in progress, step 2, checkpoint",
                         "Training in progress, step 4", "Training in progress, step 4, checkpoint"]
    folders = ["last-checkpoint", "last-checkpoint"] if strategy == "checkpoint" else ["checkpoint-2", "checkpoint-4"]
    for commit, folder in zip(hub.commits[1::2], folders):
        assert f"{folder}/trainer_state.json" in commit.files and f"{folder}/xtrainer_manifest.json" in commit.files
        assert all(path.startswith(folder + "/") for path in commit.files)
    with open(os.path.join(trainer.args.output_dir, "checkpoint-4", "trainer_state.json"), "rb") as f:
        assert hub.commits[3].files[f"{folders[1]}/trainer_state.json"] == f.read()


@pytest.mark.parametrize("kind", ["torch", "torch_xla"])
def test_hub_strategy_end(tmp_path, kind, hub):
    trainer = _trainer(tmp_path, kind, save_strategy="steps", save_steps=2, hub_strategy="end")
    trainer.train()
    assert hub.commits == []
    trainer.save_model()  # the user's save_model pushes, as in transformers
    assert [c.summary for c in hub.commits] == ["Model save"]
    assert MODEL_FILE[kind] in hub.commits[0].files and "README.md" in hub.commits[0].files


@pytest.mark.parametrize("kind", KINDS)
def test_repository_fields_reach_the_hub(tmp_path, kind, hub):
    trainer = _trainer(tmp_path, kind, hub_model_id="team/custom-name", hub_private_repo=True, hub_token="hf_other",
                       hub_revision="experiments", save_strategy="steps", save_steps=4, hub_always_push=True)
    request = hub.repos["team/custom-name"]
    assert (request["name"], request["organization"]) == ("custom-name", "team")
    # huggingface_hub 1.x sends private=True, 2.x visibility="private"
    assert request.get("private") is True or request.get("visibility") == "private"
    trainer.train()
    trainer.push_to_hub()
    assert [(c.repo, c.revision) for c in hub.commits] == [("team/custom-name", "experiments")] * 2
    assert {a for a in hub.authorizations if a} == {"Bearer hf_other"}
    assert "# custom-name" in hub.commits[-1].files["README.md"].decode()  # the card names the repository


@pytest.mark.parametrize("kind", ["torch", "jax"])
def test_hub_always_push(tmp_path, kind, monkeypatch):
    """A push still running when the next checkpoint is saved: skipped, unless hub_always_push."""
    counts = {}
    for always in (False, True):
        with FakeHub(commit_delay_s=0.8) as server:
            use_fake_hub(monkeypatch, server)
            trainer = _trainer(tmp_path, kind, name=f"run-{always}", save_strategy="steps", save_steps=1, max_steps=3,
                               hub_always_push=always)
            trainer.train()
            counts[always] = [c.summary for c in server.commits]
    assert counts[False][0] == "Training in progress, step 1" and len(counts[False]) < 3  # (a loaded machine may
    # finish step 1's push before step 3's save)
    assert counts[True] == [f"Training in progress, step {s}" for s in (1, 2, 3)]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", KINDS)
def test_unreachable_hub_fails_at_construction(tmp_path, kind, monkeypatch):
    import huggingface_hub.constants as constants

    from xtrainer.compat.hub import HubUnreachableError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(HubUnreachableError, match=rf"push_to_hub=True.*could not be created at {endpoint}.*push_to_hub=False"):
        _trainer(tmp_path, kind)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the suite's setting: offline mode is named as the cause
    with pytest.raises(HubUnreachableError, match="offline"):
        _trainer(tmp_path, kind)
    assert not os.path.exists(tmp_path / "my-run" / "checkpoint-4")


def test_a_failed_checkpoint_push_is_logged_and_training_goes_on(tmp_path, monkeypatch, caplog):
    with FakeHub(refuse_commits=True) as server:
        use_fake_hub(monkeypatch, server)
        trainer = _trainer(tmp_path, "torch", save_strategy="steps", save_steps=2, hub_always_push=True)
        with caplog.at_level(logging.ERROR, logger="xtrainer"):
            trainer.train()
    assert trainer.state.global_step == 4 and os.path.isdir(tmp_path / "my-run" / "checkpoint-4")
    failures = [r.getMessage() for r in caplog.records if "push to the Hub failed" in r.getMessage()]
    assert len(failures) == 2 and "commit refused by the fake hub" in failures[0]
