"""Trainer.hyperparameter_search with optuna on the torch, jax and torch_xla backends."""

import importlib.util

HAS_XLA = importlib.util.find_spec("torch_xla") is not None  # its runtime is started by tests/conftest.py

import pytest  # noqa: E402

import xtrainer  # noqa: E402
from helpers import RegressionModel, regression_data  # noqa: E402
from xtrainer.hyperparameter_search import default_compute_objective, default_hp_space_optuna  # noqa: E402

optuna = pytest.importorskip("optuna")

LEARNING_RATES = [1e-4, 0.05]


class ArgsSpy(xtrainer.TrainerCallback):
    """Records the arguments each trial trained with."""

    def __init__(self):
        self.seen = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen.append((args.learning_rate, args.output_dir, state.trial_name, dict(state.trial_params or {})))


def _search(tmp_path, backend, model_init, train, evaluate, **search_kw):
    args = xtrainer.TrainingArguments(
        str(tmp_path), backend=backend, per_device_train_batch_size=4, max_steps=4, logging_steps=2,
        learning_rate=1e-3, save_strategy="no", report_to="none", disable_tqdm=True, seed=3,
        train_sampling_strategy="sequential",
    )
    spy = ArgsSpy()
    trainer = xtrainer.Trainer(model_init=model_init, args=args, train_dataset=train, eval_dataset=evaluate,
                               callbacks=[spy])
    objectives = []

    def objective(metrics):
        objectives.append(default_compute_objective(metrics))
        return objectives[-1]

    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_categorical("learning_rate", LEARNING_RATES)},
        compute_objective=objective, n_trials=2, direction="minimize", backend="optuna",
        sampler=optuna.samplers.GridSampler({"learning_rate": LEARNING_RATES}), **search_kw,
    )
    return trainer, best, objectives, spy, args


def _check(tmp_path, trainer, best, objectives, spy, args):
    assert len(objectives) == 2
    lrs = [seen[0] for seen in spy.seen]
    assert sorted(lrs) == LEARNING_RATES  # each trial trained with its own learning rate
    # The learning rates were really applied: the trials end at different losses.
    assert abs(objectives[0] - objectives[1]) > 1e-3 * max(abs(objectives[0]), 1e-6)
    assert best.objective == pytest.approx(min(objectives), rel=1e-9)
    winner = lrs[objectives.index(min(objectives))]
    assert best.hyperparameters == {"learning_rate": winner}
    assert winner == 0.05  # the larger rate gets further in 4 steps
    assert best.run_id in ("0", "1")
    # Trial params went onto a copy: the user's arguments are untouched, each trial had its own output dir.
    assert args.learning_rate == 1e-3 and trainer.args is args
    assert sorted(seen[1] for seen in spy.seen) == [str(tmp_path / "run-0"), str(tmp_path / "run-1")]
    assert all(seen[3] == {"learning_rate": seen[0]} for seen in spy.seen)


def test_torch_search_picks_the_best_trial(tmp_path):
    found = _search(tmp_path, "torch", lambda: RegressionModel(), regression_data(32), regression_data(16, seed=1))
    _check(tmp_path, *found)


def test_jax_search_picks_the_best_trial(tmp_path):
    pytest.importorskip("flax")
    from flax import nnx

    from jax_models import RegressionMLP, regression_rows

    trials = []

    def model_init(trial):  # the one-argument form receives the optuna trial (None at Trainer construction)
        trials.append(trial)
        return RegressionMLP(nnx.Rngs(0))

    found = _search(tmp_path, "jax", model_init, regression_rows(64), regression_rows(32, seed=1))
    _check(tmp_path, *found)
    assert trials[0] is None and [t.number for t in trials[1:]] == [0, 1]


@pytest.mark.skipif(not HAS_XLA, reason="torch_xla is not installed (XLA lane only)")
def test_torch_xla_search_picks_the_best_trial(tmp_path):
    found = _search(tmp_path, "torch_xla", lambda: RegressionModel(), regression_data(32), regression_data(16, seed=1))
    _check(tmp_path, *found)


def test_multi_objective_and_hp_name(tmp_path):
    args = xtrainer.TrainingArguments(str(tmp_path), backend="torch", per_device_train_batch_size=4, max_steps=2,
                                      save_strategy="no", report_to="none", disable_tqdm=True)
    spy = ArgsSpy()
    trainer = xtrainer.Trainer(model_init=lambda: RegressionModel(), args=args, train_dataset=regression_data(16),
                               eval_dataset=regression_data(8, seed=1), callbacks=[spy])
    best = trainer.hyperparameter_search(
        hp_space=lambda t: {"learning_rate": t.suggest_categorical("learning_rate", LEARNING_RATES)},
        compute_objective=lambda m: [m["eval_loss"], -m["eval_loss"]], n_trials=2,
        direction=["minimize", "minimize"], hp_name=lambda t: f"lr-trial-{t.number}",
        sampler=optuna.samplers.GridSampler({"learning_rate": LEARNING_RATES}),
    )
    # Conflicting objectives (loss and -loss, both minimised): both trials are on the Pareto front.
    assert isinstance(best, list) and len(best) == 2
    assert all(isinstance(run, xtrainer.BestRun) and len(run.objective) == 2 for run in best)
    assert sorted(seen[2] for seen in spy.seen) == ["lr-trial-0", "lr-trial-1"]
    assert sorted(seen[1] for seen in spy.seen) == [str(tmp_path / "lr-trial-0"), str(tmp_path / "lr-trial-1")]


def test_search_errors(tmp_path):
    args = xtrainer.TrainingArguments(str(tmp_path), backend="torch", report_to="none", disable_tqdm=True)
    with pytest.raises(RuntimeError, match="needs a Trainer built with `model_init`"):
        xtrainer.Trainer(model=RegressionModel(), args=args).hyperparameter_search(n_trials=1)
    trainer = xtrainer.Trainer(model_init=lambda: RegressionModel(), args=args)
    with pytest.raises(ValueError, match="Unknown hyperparameter-search backend 'hyperopt'"):
        trainer.hyperparameter_search(backend="hyperopt")
    with pytest.raises(ValueError, match="'ray' is not supported by xtrainer; use 'optuna'"):
        trainer.hyperparameter_search(backend="ray")
    # transformers' default space and objective.
    space = default_hp_space_optuna(optuna.trial.FixedTrial(
        {"learning_rate": 1e-5, "num_train_epochs": 2, "seed": 7, "per_device_train_batch_size": 8}))
    assert space == {"learning_rate": 1e-5, "num_train_epochs": 2, "seed": 7, "per_device_train_batch_size": 8}
    assert default_compute_objective({"eval_loss": 0.5, "epoch": 1.0, "eval_runtime": 3.0}) == 0.5
    assert default_compute_objective({"eval_loss": 0.5, "eval_acc": 0.75, "eval_f1": 0.5}) == 1.25


def test_backend_registry_matches_the_enum():
    from xtrainer.hyperparameter_search import ALL_HYPERPARAMETER_SEARCH_BACKENDS, SUPPORTED_BACKENDS, HPSearchBackend

    # transformers 5.x: optuna, ray, wandb, keyed in the enum's order.
    assert list(ALL_HYPERPARAMETER_SEARCH_BACKENDS) == list(HPSearchBackend)
    assert [b.value for b in HPSearchBackend] == ["optuna", "ray", "wandb"]
    assert SUPPORTED_BACKENDS == (HPSearchBackend.OPTUNA,)
