"""Fields that act on the model or the step (precision, rematerialisation, compilation, kernels, determinism,
loss options, torch_xla placement options), on the backends where they have a meaning."""

import importlib.machinery
import logging
import os
import sys
import types

import numpy as np
import pytest

import xtrainer
from field_probes import PROBE_DTYPES, backend_params, make_trainer, probe, rows, torch_probe

torch = pytest.importorskip("torch")
needs_xla = pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="torch_xla is only in the XLA lane")
needs_flax = pytest.mark.skipif(importlib.util.find_spec("flax") is None, reason="flax is not installed")


@pytest.mark.parametrize("backend, precision", [
    pytest.param("jax", "bf16", id="jax-bf16", marks=needs_flax), pytest.param("jax", "fp16", id="jax-fp16", marks=needs_flax),
    pytest.param("torch", "bf16", id="torch-bf16"), pytest.param("torch", "fp16", id="torch-fp16"),
    pytest.param("torch_xla", "bf16", id="torch_xla-bf16", marks=needs_xla),
])
def test_mixed_precision_computes_in_half(tmp_path, backend, precision):
    PROBE_DTYPES.clear()
    trainer = make_trainer(backend, tmp_path, max_steps=1, train_dataset=rows(32), **{precision: True})
    trainer.train()
    half = "bfloat16" if precision == "bf16" else "float16"
    assert PROBE_DTYPES and {str(d).replace("torch.", "") for d in PROBE_DTYPES} == {half}  # the matmul ran in half
    weights = trainer.model.linear.kernel.value if backend == "jax" else trainer.model.linear.weight
    assert "float32" in str(weights.dtype)  # master weights stay float32


@needs_xla
def test_fp16_is_refused_on_torch_xla(tmp_path):
    with pytest.raises(ValueError, match="fp16=True is not supported by backend='torch_xla'.*bf16=True"):
        make_trainer("torch_xla", tmp_path, fp16=True)


@pytest.mark.parametrize("backend", backend_params())
def test_activation_checkpointing_reaches_the_model(tmp_path, backend):
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        from xtrainer.backends.jax.step import make_loss_fn

        def traced(enabled: bool) -> str:
            jax_backend = make_trainer("jax", tmp_path, activation_checkpointing=enabled).backend
            jax_backend.init_state(1)
            loss_fn = make_loss_fn(jax_backend.adapter, jax_backend.config, None, train=True)
            batch = {"x": jnp.ones((8, 4)), "labels": jnp.ones(8)}
            grad = jax.grad(lambda p: loss_fn(p, jax_backend.extra, batch, jax.random.key(0), None)[0])
            return str(jax.make_jaxpr(grad)(jax_backend.params))

        # jax.checkpoint's primitive (its name varies across jax versions; prevent_cse is its parameter)
        assert "prevent_cse" in traced(True) and "prevent_cse" not in traced(False)
        return

    class Checkpointable(type(torch_probe())):
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.enabled_with = gradient_checkpointing_kwargs

    model = Checkpointable()
    make_trainer(backend, tmp_path, model=model, activation_checkpointing=True,
                 activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.enabled_with == {"use_reentrant": False}


def test_torch_compile_options_reach_torch_compile(tmp_path, monkeypatch):
    calls = []

    def fake_compile(module, **kwargs):
        calls.append(kwargs)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    trainer = make_trainer("torch", tmp_path, max_steps=1, train_dataset=rows(8), torch_compile_backend="aot_eager",
                           torch_compile_mode="reduce-overhead")
    assert trainer.args.torch_compile  # implied by the backend / mode
    trainer.train()
    assert calls == [{"backend": "aot_eager", "mode": "reduce-overhead"}]


@pytest.mark.parametrize("backend", backend_params())
def test_use_cache_sets_the_model_config(tmp_path, backend):
    for wanted in (True, False):
        model = probe(backend)
        model.config = types.SimpleNamespace(use_cache=not wanted)
        trainer = make_trainer(backend, tmp_path, model=model, use_cache=wanted)
        assert trainer.model.config.use_cache is wanted


def test_tf32_sets_the_cuda_matmul_mode(tmp_path, caplog):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for wanted in (True, False):
            with caplog.at_level(logging.WARNING, logger="xtrainer"):
                make_trainer("torch", tmp_path, tf32=wanted)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (wanted, wanted)
        if not torch.cuda.is_available():
            assert "tf32=True has no effect on backend='torch' without a CUDA device" in caplog.text
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_liger_kernel_is_applied_with_its_config(tmp_path, monkeypatch):
    applied = []
    liger = types.ModuleType("liger_kernel")
    liger.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    liger_transformers = types.ModuleType("liger_kernel.transformers")
    liger_transformers._apply_liger_kernel_to_instance = lambda model, **config: applied.append((model, config))
    monkeypatch.setitem(sys.modules, "liger_kernel", liger)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", liger_transformers)
    model = torch_probe()
    make_trainer("torch", tmp_path, model=model, use_liger_kernel=True, liger_kernel_config={"rms_norm": False})
    assert applied == [(model, {"rms_norm": False})]


def test_underflow_overflow_debug_hooks_the_model(tmp_path):
    model = torch_probe()
    data = rows(8)
    data[0]["x"][1] = np.inf
    trainer = make_trainer("torch", tmp_path, model=model, debug="underflow_overflow", max_steps=1, train_dataset=data)
    assert model.linear._forward_hooks  # transformers' DebugUnderflowOverflow watches every module
    with pytest.raises(ValueError, match="inf/nan"):
        trainer.train()


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id != "jax"])
def test_full_determinism_switches_torch_to_deterministic_kernels(tmp_path, backend):
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        make_trainer(backend, tmp_path, full_determinism=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_average_tokens_across_devices_scales_the_loss(tmp_path):
    class CountsTokens(torch.nn.Module):  # takes num_items_in_batch (**kwargs), as transformers' LMs do
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, x, labels=None, **kwargs):
            return ((self.w * x).sum() / kwargs["num_items_in_batch"],)

    losses = {}
    for average in (True, False):
        trainer = make_trainer("torch", tmp_path, model=CountsTokens(), average_tokens_across_devices=average)
        backend = trainer.backend
        backend.num_processes = 2  # as on 2 processes: the token count is the sum over both
        inputs = {"x": torch.ones(3), "labels": torch.ones(3)}
        losses[average] = float(backend._compute_loss(backend.model, inputs, torch.tensor(6.0)))
    assert losses == {True: 2.0, False: 1.0}  # scaled by the world size only when averaging across devices


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id != "jax"])
def test_label_smoothing_changes_the_loss(tmp_path, backend):
    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x, labels=None):
            return (self.linear(x),)

    data = [{"x": r["x"] / 10, "labels": i % 3} for i, r in enumerate(rows(8))]
    model = Classifier()
    with torch.no_grad():
        logits = model(torch.tensor(np.stack([r["x"] for r in data])))[0].double().numpy()
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    labels = np.array([r["labels"] for r in data])
    eps = 0.2
    expected = np.mean((1 - eps) * -logp[np.arange(8), labels] + eps * -logp.mean(-1))
    trainer = make_trainer(backend, tmp_path, model=model, label_smoothing_factor=eps, per_device_eval_batch_size=2)
    assert trainer.evaluate(data)["eval_loss"] == pytest.approx(expected, rel=1e-5)


@needs_xla
def test_sharding_rules_place_torch_xla_parameters(tmp_path):
    from xtrainer.backends.torch_xla import spmd

    trainer = make_trainer("torch_xla", tmp_path, sharding_rules=[["linear.weight", [None, "data"]]])
    assert trainer.backend.param_specs["linear.weight"] == (None, "data")
    device_weight = dict(trainer.backend.model.named_parameters())["linear.weight"]
    assert "devices=[1,4]" in spmd.sharding_of(device_weight)
    plain = make_trainer("torch_xla", tmp_path)
    assert "replicated" in spmd.sharding_of(dict(plain.backend.model.named_parameters())["linear.weight"])


@needs_xla
def test_xla_static_shape_options_reach_the_backend(tmp_path):
    from xtrainer.backends.torch_xla.backend import XlaOptions

    trainer = make_trainer("torch_xla", tmp_path, xla_pad_batches=False, xla_seq_bucket="16", xla_max_graphs=3,
                           xla_on_recompile="raise")
    assert trainer.backend.options == XlaOptions(pad_batches=False, seq_bucket=16, max_graphs=3, on_recompile="raise")


class _Payload:
    """Unpickling it writes a marker file (what a malicious pickle could do worse)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@needs_xla
def test_torch_xla_reads_checkpoints_with_the_torch_safe_loader(tmp_path):
    from xtrainer.backends.torch import state_io
    from xtrainer.manifest import write_manifest

    out, marker = tmp_path / "run", str(tmp_path / "marker")
    make_trainer("torch_xla", out, max_steps=2, save_strategy="steps", save_steps=2, train_dataset=rows(32)).train()
    checkpoint = out / "checkpoint-2"
    rng = torch.load(checkpoint / "rng_state.pth", weights_only=False)
    rng["extra"] = _Payload(marker)
    torch.save(rng, checkpoint / "rng_state.pth")
    write_manifest(str(checkpoint))
    with pytest.raises(state_io.UnsafeCheckpointError, match="allow_unsafe_checkpoint_load=True"):
        make_trainer("torch_xla", out, max_steps=4, train_dataset=rows(32)).train(resume_from_checkpoint=True)
    assert not os.path.exists(marker)
    resumed = make_trainer("torch_xla", out, max_steps=4, train_dataset=rows(32), allow_unsafe_checkpoint_load=True)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4 and open(marker).read() == "ran"
