"""backend="auto": Flax -> jax; torch -> torch_xla on a TPU host, else native torch (device availability faked)."""

import pytest

from xtrainer.backends import registry


def _fake(monkeypatch, accelerator, available, torchax=False):
    monkeypatch.setattr(registry, "detect_accelerator", lambda: accelerator)
    monkeypatch.setattr(registry, "available_backends", lambda: list(available))
    real = registry._importable
    monkeypatch.setattr(registry, "_importable", lambda m: torchax if m == "torchax" else real(m))


def _kind(monkeypatch, kind):
    monkeypatch.setattr(registry, "model_kind", lambda model: kind)


@pytest.mark.parametrize(
    "accelerator,available,kind,torchax,expected",
    [
        ("tpu", ["torch", "jax", "torch_xla"], "torch", False, "torch_xla"),
        ("tpu", ["torch", "jax"], "torch", True, "jax"),  # no torch_xla: torchax on the JAX backend
        ("tpu", ["torch", "jax"], "torch", False, "torch"),
        ("tpu", ["torch", "jax", "torch_xla"], "flax", False, "jax"),
        ("gpu", ["torch", "jax", "torch_xla"], "torch", True, "torch"),
        ("gpu", ["torch", "jax"], "flax", False, "jax"),
        ("cpu", ["torch", "jax"], "torch", False, "torch"),
        ("cpu", ["torch", "jax"], "flax", False, "jax"),
    ],
)
def test_auto_selection(monkeypatch, accelerator, available, kind, torchax, expected):
    _fake(monkeypatch, accelerator, available, torchax)
    _kind(monkeypatch, kind)
    assert registry.resolve_backend_name("auto", object()) == expected


def test_auto_without_a_backend_for_the_model(monkeypatch):
    _fake(monkeypatch, "cpu", ["torch"])
    _kind(monkeypatch, "flax")
    with pytest.raises(ValueError, match="found no backend.*available backends: torch"):
        registry.resolve_backend_name("auto", object())


def test_detect_accelerator_reads_tpu_markers(monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    assert registry.detect_accelerator() == "tpu"
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
    assert registry.detect_accelerator() in ("cpu", "gpu")
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    assert registry.detect_accelerator() == "tpu"


def test_real_models_are_classified():
    torch = pytest.importorskip("torch")
    nnx = pytest.importorskip("flax.nnx")
    assert registry.model_kind(torch.nn.Linear(2, 2)) == "torch"
    assert registry.model_kind(nnx.Linear(2, 2, rngs=nnx.Rngs(0))) == "flax"
    assert registry.model_kind(object()) == "unknown"


def test_missing_dependency_names_the_extra(monkeypatch):
    monkeypatch.setattr(registry, "_importable", lambda m: m != "jax")
    with pytest.raises(ValueError, match=r"needs jax.*pip install 'xtrainer\[jax\]'"):
        registry.resolve_backend_name("jax", object())
