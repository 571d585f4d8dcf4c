"""push_to_hub and the hub_* fields, against a stand-in Hub on 127.0.0.1 (tests/fake_hub.py) reached through
HF_ENDPOINT: the repository is created at Trainer(...), checkpoints and the final model arrive as commits, and an
unreachable Hub fails before training."""

from __future__ import annotations

import json
import logging

import pytest

import xtrainer
from fake_hub import FakeHub
from helpers import RegressionModel, regression_data

pytest.importorskip("huggingface_hub")


@pytest.fixture
def hub(monkeypatch):
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        import huggingface_hub.constants as constants

        # huggingface_hub reads these once at import; the tests point them at the stand-in.
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield server


def _args(tmp_path, **kw):
    base = dict(backend="torch", per_device_train_batch_size=4, max_steps=4, save_steps=2, logging_steps=1,
                report_to="none", disable_tqdm=True, push_to_hub=True, hub_token="secret", hub_model_id="me/tiny")
    base.update(kw)
    return xtrainer.TrainingArguments(str(tmp_path / "tiny"), **base)


def test_every_save_pushes_the_model_and_push_to_hub_adds_the_card(tmp_path, hub):
    # hub_always_push: a save pushes even while the previous upload runs; without it a slow upload makes the
    # next save skip its push (transformers' rule), and which saves push would depend on the machine's load.
    trainer = xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path, hub_always_push=True),
                               train_dataset=regression_data(32))
    assert trainer.hub_model_id == "me/tiny" and "me/tiny" in hub.repos  # created at Trainer(...)
    trainer.train()
    commits = hub.repos["me/tiny"]["commits"]
    assert [c["summary"] for c in commits] == ["Training in progress, step 2", "Training in progress, step 4"]
    assert "model.safetensors" in commits[0]["files"] and "training_args.bin" in commits[0]["files"]
    assert not any(f.startswith("checkpoint-") for c in commits for f in c["files"])
    trainer.push_to_hub(commit_message="final", tags="tiny-tag")
    final = hub.repos["me/tiny"]["commits"][-1]
    assert final["summary"] == "final" and "README.md" in final["files"]
    card = hub.repos["me/tiny"]["files"]["README.md"].decode()
    assert "tiny-tag" in card and "generated_from_trainer" in card
    assert "learning_rate: 5e-05" in card and "train_batch_size: 4" in card  # the hyperparameters


def test_jax_checkpoints_push_the_exported_model(tmp_path, hub):
    pytest.importorskip("flax")
    from flax import nnx

    from jax_models import RegressionMLP, regression_rows

    trainer = xtrainer.Trainer(model=RegressionMLP(nnx.Rngs(0)), train_dataset=regression_rows(32),
                               args=_args(tmp_path, backend="jax", per_device_train_batch_size=1, hub_model_id="me/jax"))
    trainer.train()
    first = hub.repos["me/jax"]["commits"][0]
    assert first["summary"] == "Training in progress, step 2" and "flax_model.msgpack" in first["files"]


def test_checkpoint_strategies(tmp_path, hub):
    trainer = xtrainer.Trainer(model=RegressionModel(), train_dataset=regression_data(32),
                               args=_args(tmp_path / "a", hub_strategy="checkpoint", hub_model_id="me/a",
                                          hub_always_push=True))
    trainer.train()
    files = hub.repos["me/a"]["files"]
    assert "last-checkpoint/trainer_state.json" in files and "last-checkpoint/optimizer.pt" in files
    assert json.loads(files["last-checkpoint/trainer_state.json"])["global_step"] == 4
    trainer = xtrainer.Trainer(model=RegressionModel(), train_dataset=regression_data(32),
                               args=_args(tmp_path / "b", hub_strategy="all_checkpoints", hub_model_id="me/b",
                                          hub_always_push=True))
    trainer.train()
    assert {"checkpoint-2/trainer_state.json", "checkpoint-4/trainer_state.json"} <= set(hub.repos["me/b"]["files"])
    trainer = xtrainer.Trainer(model=RegressionModel(), train_dataset=regression_data(32),
                               args=_args(tmp_path / "c", hub_strategy="end", hub_model_id="me/c"))
    trainer.train()
    assert hub.repos["me/c"]["commits"] == []  # "end": nothing until save_model
    trainer.save_model()
    assert hub.repos["me/c"]["commits"][-1]["summary"] == "Model save"


@pytest.mark.parametrize("always", [False, True])
def test_a_push_in_flight_skips_the_next_unless_hub_always_push(tmp_path, hub, always):
    hub.commit_delay = 1.0  # the step-2 upload is still running when step 4 is saved
    trainer = xtrainer.Trainer(model=RegressionModel(), train_dataset=regression_data(32),
                               args=_args(tmp_path, hub_always_push=always, hub_model_id=f"me/{always}"))
    trainer.train()  # waits for the uploads in flight at the end
    summaries = [c["summary"] for c in hub.repos[f"me/{always}"]["commits"]]
    expected = ["Training in progress, step 2"] + (["Training in progress, step 4"] if always else [])
    assert summaries == expected


def test_private_repo_revision_and_default_name(tmp_path, hub):
    trainer = xtrainer.Trainer(model=RegressionModel(), train_dataset=regression_data(16),
                               args=_args(tmp_path, hub_model_id=None, hub_private_repo=True, hub_revision="dev",
                                          max_steps=2))
    assert hub.repos["tester/tiny"]["private"] is True  # output_dir's name in the user's namespace
    trainer.train()
    assert [c["revision"] for c in hub.repos["tester/tiny"]["commits"]] == ["dev"]


def test_unreachable_hub_fails_at_construction(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(RuntimeError, match=r"push_to_hub: cannot create or reach the Hub repository 'me/tiny'"):
        xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path), train_dataset=regression_data(8))


def test_offline_mode_fails_at_construction(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE must be unset"):
        xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path), train_dataset=regression_data(8))


def test_background_commits_arrive_in_checkpoint_order(tmp_path, hub):
    """One client per Trainer: the step-4 upload waits for the (slow) step-2 one instead of overtaking it."""
    hub.commit_delays = [1.0]  # only the first commit is slow
    trainer = xtrainer.Trainer(model=RegressionModel(), train_dataset=regression_data(32),
                               args=_args(tmp_path, hub_always_push=True, hub_model_id="me/order"))
    trainer.train()
    assert [c["summary"] for c in hub.repos["me/order"]["commits"]] == ["Training in progress, step 2",
                                                                         "Training in progress, step 4"]


def test_a_failed_checkpoint_push_is_logged_and_training_goes_on(tmp_path, hub, caplog):
    hub.refuse_commits = True
    trainer = xtrainer.Trainer(model=RegressionModel(), train_dataset=regression_data(32),
                               args=_args(tmp_path, hub_always_push=True))
    with caplog.at_level(logging.ERROR, logger="xtrainer"):
        trainer.train()
    assert trainer.state.global_step == 4 and (tmp_path / "tiny" / "checkpoint-4").is_dir()
    failures = [r.getMessage() for r in caplog.records if "push to the Hub failed" in r.getMessage()]
    assert len(failures) == 2 and "commit refused by the fake hub" in failures[0]
