"""tokens_per_second and mfu in the training logs (xtrainer/throughput.py, Backend.step_flops/peak_flops)."""

import importlib.util
import types

HAS_XLA = importlib.util.find_spec("torch_xla") is not None  # its runtime is started by tests/conftest.py

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import xtrainer  # noqa: E402
from xtrainer.throughput import (  # noqa: E402
    ThroughputMeter,
    analytic_train_flops,
    count_tokens,
    device_peak_flops,
    peak_flops_for_device_kind,
)

SEQ = 16


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeBackend:
    def __init__(self, flops=None, peak=None):
        self.flops, self.peak = flops, peak

    def step_flops(self):
        return self.flops

    def peak_flops(self):
        return self.peak


def test_count_tokens_definition():
    ids = np.zeros((2, 5), np.int64)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert count_tokens({"input_ids": ids, "attention_mask": mask}) == 8  # real tokens, padding excluded
    assert count_tokens({"input_ids": ids}) == 10
    assert count_tokens({"x": np.ones((4, 3))}) == 0


def test_meter_rates_and_excluded_time():
    clock = FakeClock()
    meter = ThroughputMeter(FakeBackend(flops=1e9, peak=1e11), clock=clock)
    window = [{"input_ids": np.zeros((4, 8))}, {"input_ids": np.zeros((4, 8))}]  # 64 tokens per step
    meter.add(window)
    meter.add(window)
    clock.now += 1.0
    with meter.paused():  # an evaluation: left out
        clock.now += 50.0
    clock.now += 1.0
    fields = meter.report()
    assert fields["tokens_per_second"] == pytest.approx(128 / 2.0)
    assert fields["mfu"] == pytest.approx(2 * 1e9 / 2.0 / 1e11)
    # The next report covers only what came after this one.
    meter.add(window)
    clock.now += 4.0
    assert meter.report() == {"tokens_per_second": pytest.approx(16.0), "mfu": pytest.approx(1e9 / 4.0 / 1e11)}
    # No tokens, no FLOPs: nothing to report rather than zeros.
    quiet = ThroughputMeter(FakeBackend(), clock=clock)
    quiet.add([{"x": np.ones((2, 2))}])
    clock.now += 1.0
    assert quiet.report() == {}


def test_mfu_above_one_is_never_logged(caplog):
    """An mfu above 1 is impossible (the demo once logged 1.0 to 6.9 on CPU from a numpy-measured peak):
    the meter drops it and warns once that the peak figure is wrong."""
    clock = FakeClock()
    meter = ThroughputMeter(FakeBackend(flops=5e11, peak=1e11), clock=clock)  # 5 FLOP per peak FLOP: impossible
    window = [{"input_ids": np.zeros((4, 8))}]
    with caplog.at_level("WARNING", logger="xtrainer.throughput"):
        for _ in range(2):
            meter.add(window)
            clock.now += 1.0
            fields = meter.report()
            assert "mfu" not in fields and fields["tokens_per_second"] == pytest.approx(32.0)
    warnings = [r.getMessage() for r in caplog.records if "mfu" in r.getMessage()]
    assert len(warnings) == 1 and "above 1" in warnings[0] and "XTRAINER_PEAK_FLOPS" in warnings[0]
    # At the edge (exactly the peak) it is logged.
    meter = ThroughputMeter(FakeBackend(flops=1e11, peak=1e11), clock=clock)
    meter.add(window)
    clock.now += 1.0
    assert meter.report()["mfu"] == pytest.approx(1.0)


def test_peak_table_and_override(monkeypatch):
    assert peak_flops_for_device_kind("TPU v5 lite") == 197e12
    assert peak_flops_for_device_kind("TPU v5") == 459e12
    assert peak_flops_for_device_kind("TPU v6 lite") == 918e12
    assert peak_flops_for_device_kind("TPU v4") == 275e12
    assert peak_flops_for_device_kind("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_device_kind("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_device_kind("Some new chip") is None
    assert device_peak_flops("Some new chip", "tpu") is None
    # CPU: the backend's own measurement (the library that runs its steps); none given, no peak and no mfu.
    assert device_peak_flops("cpu", "cpu", measure=lambda: 3e10) == 3e10
    assert device_peak_flops("cpu", "cpu") is None
    monkeypatch.setenv("XTRAINER_PEAK_FLOPS", "2.5e12")
    assert device_peak_flops("TPU v4", "tpu") == 2.5e12
    monkeypatch.setenv("XTRAINER_PEAK_FLOPS", "fast")
    with pytest.raises(ValueError, match="XTRAINER_PEAK_FLOPS='fast' is not a number"):
        device_peak_flops("TPU v4", "tpu")


def _check_logs(trainer, expect_mfu: bool):
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs
    for entry in logs:
        assert entry["tokens_per_second"] > 0
        if expect_mfu:
            assert 0 < entry["mfu"] < 1
        else:
            assert "mfu" not in entry
    return logs


class TorchTokenLM(torch.nn.Module):
    def __init__(self, vocab=64, dim=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(self.embed(input_ids))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits}


def test_torch_logs_tokens_per_second_without_mfu(tmp_path):
    args = xtrainer.TrainingArguments(str(tmp_path), backend="torch", per_device_train_batch_size=4, max_steps=2,
                                      logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    rows = [{**row, "attention_mask": [1] * (SEQ - 4) + [0] * 4} for row in _token_rows(8)]
    trainer = xtrainer.Trainer(model=TorchTokenLM(), args=args, train_dataset=rows)
    trainer.train()
    _check_logs(trainer, expect_mfu=False)
    assert trainer.backend.step_flops() is None


# ------------------------------------------------------------------ JAX


def _jax_token_model():
    from flax import nnx
    import optax

    class TokenMLP(nnx.Module):
        """Embedding -> MLP -> vocabulary logits: a model whose matmul FLOPs are 6·N·tokens, nearly."""

        def __init__(self, rngs, vocab=64, dim=32, hidden=128):
            self.embed = nnx.Embed(vocab, dim, rngs=rngs)
            self.up = nnx.Linear(dim, hidden, rngs=rngs)
            self.down = nnx.Linear(hidden, dim, rngs=rngs)
            self.head = nnx.Linear(dim, vocab, rngs=rngs)

        def __call__(self, input_ids, labels=None):
            logits = self.head(self.down(nnx.relu(self.up(self.embed(input_ids)))))
            if labels is None:
                return {"logits": logits}
            return {"loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), "logits": logits}

    model = TokenMLP(nnx.Rngs(0))
    import jax

    matmul_params = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
                        if "embed" not in str(path))  # a lookup, not a matmul
    return model, matmul_params


def _token_rows(n, vocab=64):
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(0, vocab, SEQ).tolist(), "labels": rng.integers(0, vocab, SEQ).tolist()}
            for _ in range(n)]


def test_jax_logs_mfu_from_the_compiled_step(tmp_path, monkeypatch):
    # Accumulation 2: XLA counts the scanned micro-batch body once; step_flops must count it twice.
    accumulation = 2
    pytest.importorskip("flax")
    model, matmul_params = _jax_token_model()
    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax", per_device_train_batch_size=1, max_steps=2,
                                      logging_steps=1, gradient_accumulation_steps=accumulation, save_strategy="no",
                                      report_to="none", disable_tqdm=True)
    trainer = xtrainer.Trainer(model=model, args=args, train_dataset=_token_rows(64))
    trainer.train()
    _check_logs(trainer, expect_mfu=True)
    tokens_per_step = trainer.backend.mesh.devices.size * 1 * SEQ * accumulation
    analytic = analytic_train_flops(matmul_params, tokens_per_step)
    flops = trainer.backend.step_flops()
    # XLA's count adds the softmax, relu, loss and optimizer to the matmuls; and the scanned
    # accumulation body is counted accumulation times, not once.
    assert analytic <= flops < 2 * analytic, (flops, analytic)
    assert trainer.backend.peak_flops() > 0
    monkeypatch.setenv("XTRAINER_PEAK_FLOPS", "1e15")
    assert trainer.backend.peak_flops() == 1e15  # CPU: the override is the whole host's figure




# ------------------------------------------------------------------ torch_xla (XLA lane)


@pytest.mark.skipif(not HAS_XLA, reason="torch_xla is not installed (XLA lane only)")
def test_torch_xla_logs_mfu_from_analytic_flops(tmp_path):
    args = xtrainer.TrainingArguments(str(tmp_path), backend="torch_xla", per_device_train_batch_size=1, max_steps=2,
                                      logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    model = TorchTokenLM()
    model.config = types.SimpleNamespace(num_hidden_layers=1, hidden_size=16)  # read for the attention term
    trainer = xtrainer.Trainer(model=model, args=args, train_dataset=_token_rows(16))
    trainer.train()
    _check_logs(trainer, expect_mfu=True)
    params = sum(p.numel() for p in model.parameters())
    tokens = trainer.backend.local_batch_devices * SEQ
    expected = 6 * params * tokens + 12 * 1 * 16 * SEQ * tokens
    assert trainer.backend.step_flops() == pytest.approx(expected)
    assert trainer.backend.peak_flops() > 0  # CPU: the measured host figure
