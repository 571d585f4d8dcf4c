"""xtrainer.schedules against transformers' get_scheduler (bitwise), under jax.jit, and ReduceLROnPlateau."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xtrainer.schedules import (
    METRIC_DRIVEN,
    GreedyState,
    PlateauState,
    build_schedule,
    greedy_init,
    greedy_update,
    plateau_init,
    plateau_update,
    schedule_names,
)
from xtrainer.trainer_utils import SchedulerType

LR = 1e-3
TOTAL = 50
N_STEPS = 60  # past TOTAL, to cover what each schedule does after the run's nominal end

# (name, num_warmup_steps, scheduler_kwargs)
CASES = [
    ("linear", 0, {}),
    ("linear", 10, {}),
    ("cosine", 0, {}),
    ("cosine", 5, {"num_cycles": 1.5}),
    ("cosine_with_restarts", 5, {}),
    ("cosine_with_restarts", 0, {"num_cycles": 3}),
    ("polynomial", 5, {}),
    ("polynomial", 5, {"lr_end": 1e-5, "power": 2.0}),
    ("polynomial", 0, {"power": 0.5}),
    ("constant", 0, {}),
    ("constant", 7, {}),
    ("constant_with_warmup", 10, {}),
    ("constant_with_warmup", 0, {}),
    ("inverse_sqrt", 10, {}),
    ("inverse_sqrt", 10, {"timescale": 25}),
    ("inverse_sqrt", 0, {}),
    ("cosine_with_min_lr", 5, {"min_lr": 1e-5}),
    ("cosine_with_min_lr", 0, {"min_lr_rate": 0.1, "num_cycles": 1.0}),
    ("warmup_stable_decay", 5, {"num_decay_steps": 10}),
    ("warmup_stable_decay", 8, {"num_decay_steps": 12, "warmup_type": "cosine", "decay_type": "linear",
                                "min_lr_ratio": 0.1}),
    ("warmup_stable_decay", 8, {"num_decay_steps": 15, "num_stable_steps": 20, "warmup_type": "1-sqrt",
                                "decay_type": "1-sqrt", "min_lr_ratio": 0.05, "num_cycles": 1.0}),
    ("cosine_warmup_with_min_lr", 5, {"min_lr": 1e-5}),
    ("cosine_warmup_with_min_lr", 0, {"min_lr_rate": 0.1, "num_cycles": 1.0}),
    ("cosine_warmup_with_min_lr", 6, {"min_lr_rate": 0.05, "warmup_lr_rate": 0.2}),
    ("cosine_warmup_with_min_lr", 1, {"min_lr_rate": 0.0, "warmup_lr_rate": 0.5}),
    ("reduce_lr_on_plateau", 0, {}),
    ("greedy", 0, {}),
]
IDS = [f"{name}-w{w}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for name, w, kw in CASES]


def _ours(name, warmup, kwargs):
    return build_schedule(name, num_training_steps=TOTAL, num_warmup_steps=warmup, learning_rate=LR,
                          scheduler_kwargs=kwargs)


def _torch_optimizer():
    torch = pytest.importorskip("torch")
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)


def test_every_schedule_type_is_covered():
    assert schedule_names() == [t.value for t in SchedulerType]
    assert {name for name, _, _ in CASES} == set(schedule_names())


def test_every_transformers_schedule_type_exists():
    transformers_types = pytest.importorskip("transformers.trainer_utils").SchedulerType
    assert [t.value for t in transformers_types] == [t.value for t in SchedulerType]


@pytest.mark.filterwarnings("ignore:Both num_training_steps and num_stable_steps:UserWarning")
@pytest.mark.parametrize("name,warmup,kwargs", CASES, ids=IDS)
def test_bitwise_parity_with_transformers(name, warmup, kwargs):
    transformers = pytest.importorskip("transformers")
    optimizer = _torch_optimizer()
    hf_kwargs = {} if name in METRIC_DRIVEN else kwargs
    hf = transformers.get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=TOTAL,
                                    scheduler_specific_kwargs=hf_kwargs)
    schedule = _ours(name, warmup, kwargs)
    for step in range(N_STEPS):
        multiplier = schedule(step)
        assert type(multiplier) is float
        assert LR * multiplier == optimizer.param_groups[0]["lr"], f"step {step}"
        optimizer.step()
        if name in METRIC_DRIVEN:
            hf.step(1.0)  # a flat metric; the metric-driven part is tested separately
            break
        hf.step()


@pytest.mark.parametrize("name,warmup,kwargs", CASES, ids=IDS)
def test_jit_int32_step_matches_python(name, warmup, kwargs):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    schedule = _ours(name, warmup, kwargs)
    jitted = jax.jit(schedule)
    want = np.array([schedule(step) for step in range(N_STEPS)])
    got = np.array([jitted(jnp.int32(step)) for step in range(N_STEPS)])
    assert got.dtype == np.float32
    # float32 on device: relative 1e-6, plus an absolute floor for multipliers that decay to ~0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    batched = jax.jit(jax.vmap(schedule))(jnp.arange(N_STEPS, dtype=jnp.int32))
    np.testing.assert_allclose(np.asarray(batched), want, rtol=1e-6, atol=1e-6)


def test_numpy_integer_and_enum_inputs():
    schedule = build_schedule(SchedulerType.LINEAR, num_training_steps=10, num_warmup_steps=2)
    assert schedule(np.int64(1)) == schedule(1) == 0.5
    assert type(schedule(np.int32(5))) is float


METRICS = [1.0, 0.9, 0.95, 0.95, 0.95, 0.8, 0.8, 0.8, 0.8, 0.81, 0.7999, 0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.5,
           0.6, 0.6, 0.6, 0.6, 0.6, 0.49999, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]
PLATEAU_CASES = [
    {},
    {"patience": 2, "factor": 0.5, "cooldown": 2},
    {"patience": 1, "mode": "max", "threshold_mode": "abs", "threshold": 0.01, "min_lr": 2e-4},
    {"patience": 0, "factor": 0.5, "eps": 1e-4, "threshold": 0.0},
    {"patience": 0, "threshold_mode": "abs", "threshold": 0.05, "factor": 0.3, "cooldown": 1},
]


@pytest.mark.parametrize("kwargs", PLATEAU_CASES, ids=[str(k) for k in PLATEAU_CASES])
def test_plateau_matches_torch(kwargs):
    transformers = pytest.importorskip("transformers")
    optimizer = _torch_optimizer()
    hf = transformers.get_scheduler("reduce_lr_on_plateau", optimizer, scheduler_specific_kwargs=kwargs)
    state = plateau_init(LR, kwargs)
    assert isinstance(state, PlateauState) and state.multiplier == 1.0
    ours, theirs = [], []
    for metric in METRICS * 2:
        state = plateau_update(state, metric)
        hf.step(metric)
        ours.append(state.lr)
        theirs.append(optimizer.param_groups[0]["lr"])
        assert math.isclose(LR * state.multiplier, state.lr, rel_tol=1e-12)
    assert ours == theirs
    assert len(set(ours)) > 1 or not kwargs  # the metric sequence does trigger reductions


GREEDY_METRICS = ([1.0 / (i + 1) for i in range(30)] + [0.5] * 40 + [0.9, 0.2, 0.7, 0.1, 0.6, 0.15, 0.8] * 6
                  + [0.05 - 0.001 * i for i in range(25)])
GREEDY_CASES = [
    {},
    {"patience": 2, "min_lr": 1e-4, "max_lr": 0.1},
    {"patience": 1, "min_lr": 1e-3, "cooldown": 2, "warmup": 1},
    {"patience": 0, "factor": 0.5, "min_lr": 2e-3, "reset_start": 3, "cooldown": 1, "warmup": 1},
    {"patience": 0, "smooth": True, "window_size": 4, "min_lr": 1e-5, "threshold_mode": "rel", "threshold": 0.01},
    {"mode": "max", "patience": 1, "min_lr": [1e-4]},
    {"patience": 0, "factor": 0.5, "eps": 1e-3, "min_lr": 1e-4, "max_lr": 0.05},
]


@pytest.mark.parametrize("kwargs", GREEDY_CASES, ids=[str(k) for k in GREEDY_CASES])
def test_greedy_matches_transformers(kwargs):
    transformers = pytest.importorskip("transformers")
    lr = 1e-2
    optimizer = _torch_optimizer()
    optimizer.param_groups[0]["lr"] = lr
    hf = transformers.get_scheduler("greedy", optimizer, scheduler_specific_kwargs=kwargs)
    state = greedy_init(lr, kwargs)
    assert isinstance(state, GreedyState) and state.multiplier == 1.0
    ours = []
    for metric in GREEDY_METRICS:
        state = greedy_update(state, metric)
        hf.step(metric)
        assert state.lr == optimizer.param_groups[0]["lr"], metric
        assert math.isclose(lr * state.multiplier, state.lr, rel_tol=1e-12)
        ours.append(state.lr)
    assert len(set(ours)) > 2  # the metric sequence moves the lr both ways
    if kwargs.get("reset_start") == 3:
        assert any(b == lr and a < lr for a, b in zip(ours, ours[1:]))  # a stay at min_lr resets to the base lr


def test_greedy_rejects_what_it_cannot_schedule():
    with pytest.raises(ValueError, match="factor"):
        greedy_init(1e-3, {"factor": 1.0})
    with pytest.raises(ValueError, match="per-group `min_lr`"):
        greedy_init(1e-3, {"min_lr": [1e-4, 1e-5]})
    with pytest.raises(ValueError, match="patiance"):
        build_schedule("greedy", num_training_steps=5, learning_rate=1e-3, scheduler_kwargs={"patiance": 2})


def test_greedy_verbose_prints_each_change(capsys):
    state = greedy_init(1e-2, {"patience": 0, "min_lr": 1e-4, "verbose": True})
    for metric in (1.0, 1.0):
        state = greedy_update(state, metric)
    out = capsys.readouterr().out
    assert "Epoch 1: increasing learning rate of group 0 to 1.0526e-02." in out  # better than inf
    assert "Epoch 2: reducing learning rate of group 0 to 1.0000e-02." in out  # no better


def test_plateau_default_multiplier_and_step_schedule():
    state = plateau_init()
    for _ in range(12):
        state = plateau_update(state, 1.0)
    assert state.multiplier == pytest.approx(0.1)
    assert build_schedule("reduce_lr_on_plateau", num_training_steps=5)(3) == 1.0


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_schedule("cosine_annealing", num_training_steps=10)
    assert "cosine_annealing" in str(err.value)
    for name in schedule_names():
        assert name in str(err.value)


@pytest.mark.parametrize("name,kwargs,needle", [
    ("cosine", {"num_cycle": 2}, "num_cycle"),
    ("linear", {"power": 2}, "power"),
    ("reduce_lr_on_plateau", {"patiance": 3}, "patiance"),
    ("reduce_lr_on_plateau", {"factor": 1.5}, "factor"),
    ("warmup_stable_decay", {"num_decay_steps": 5, "decay_type": "exp"}, "decay_type"),
    ("warmup_stable_decay", {}, "num_decay_steps"),
    ("cosine_with_min_lr", {}, "min_lr"),
    ("cosine_with_min_lr", {"min_lr": 1e-5, "min_lr_rate": 0.1}, "min_lr_rate"),
    ("cosine_warmup_with_min_lr", {}, "min_lr"),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1, "warmup_lr": 0.1}, "warmup_lr"),
    ("polynomial", {"lr_end": 1.0}, "lr_end"),
])
def test_bad_kwargs_are_named(name, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        build_schedule(name, num_training_steps=10, learning_rate=LR, scheduler_kwargs=kwargs)


def test_bad_step_counts_and_missing_learning_rate():
    with pytest.raises(ValueError, match="num_warmup_steps"):
        build_schedule("linear", num_training_steps=10, num_warmup_steps=-1)
    with pytest.raises(ValueError, match="num_training_steps"):
        build_schedule("linear", num_training_steps=-5)
    with pytest.raises(ValueError, match="learning_rate"):
        build_schedule("polynomial", num_training_steps=10)
    with pytest.raises(ValueError, match="learning_rate"):
        build_schedule("cosine_with_min_lr", num_training_steps=10, scheduler_kwargs={"min_lr": 1e-5})
