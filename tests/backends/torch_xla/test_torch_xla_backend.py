"""backend="torch_xla" on PJRT CPU with 4 devices: SPMD meshes, parity with the torch backend,
static shapes and the recompilation guard, checkpoints and resume, bf16, evaluation.

Runs in the XLA lane only (skipped where torch_xla is not installed).
"""

import os

import numpy as np
import pytest

torch_xla = pytest.importorskip("torch_xla")

import torch  # noqa: E402
import torch_xla.debug.metrics as met  # noqa: E402
import transformers  # noqa: E402

import xtrainer  # noqa: E402
from helpers import RegressionModel, lm_data, regression_data  # noqa: E402

MESHES = {"4x1x1": {"data": 4}, "2x2x1": {"data": 2, "fsdp": 2}, "1x4x1": {"fsdp": 4}, "1x2x2": {"fsdp": 2, "tensor": 2}}
GLOBAL_BATCH = 8  # 20 examples -> batches of 8, 8, 4 per epoch


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config)


DATA = lm_data(20, seq=16, vocab=64)

BASE = dict(learning_rate=1e-2, num_train_epochs=2, logging_steps=1, report_to="none", disable_tqdm=True, seed=1,
            train_sampling_strategy="sequential", save_strategy="no")


def _batch_devices(mesh):
    return 1 if mesh is None else mesh.get("data", 1) * mesh.get("fsdp", 1)


def _args(path, backend, mesh=None, **kw):
    """Arguments for a run with a global batch of 8 (per_device_train_batch_size counts per batch device)."""
    per_device = GLOBAL_BATCH // _batch_devices(mesh)
    kw = {**BASE, "per_device_train_batch_size": per_device, "per_device_eval_batch_size": per_device, **kw}
    return xtrainer.TrainingArguments(str(path), backend=backend, mesh=mesh, **kw)


def _losses(trainer, after=0):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > after]


def _grad_norms(trainer):
    return [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]


def _assert_close_weights(a, b, atol):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], rtol=0, atol=atol, msg=name)


def _sharding(tensor):
    return torch_xla._XLAC._get_xla_sharding_spec(tensor)


def _host_reads():
    data = met.metric_data("TransferFromDeviceTime")
    return data[0] if data else 0


def _compiles():
    data = met.metric_data("CompileTime")
    return data[0] if data else 0


class _StepProbe(transformers.TrainerCallback):
    """Device -> host transfers and XLA compilations between on_step_begin and on_step_end, i.e. in train_step."""

    def __init__(self):
        self.reads, self.compiles = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self._before = (_host_reads(), _compiles())

    def on_step_end(self, args, state, control, **kwargs):
        self.reads.append(_host_reads() - self._before[0])
        self.compiles.append(_compiles() - self._before[1])


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
    trainer = xtrainer.Trainer(model=tiny_gpt2(), args=_args(tmp_path_factory.mktemp("ref"), "torch"), train_dataset=DATA)
    trainer.train()
    return trainer


# Expected annotations of a few parameters per mesh. The default FSDP rule shards the largest dim
# the fsdp axis divides (c_fc.weight is a Conv1D weight of shape (32, 128)); with fsdp=1 everything
# is replicated. In the 2x2x1 run user rules override the default for c_fc.weight and wpe.weight.
RULES = {
    "2x2x1": [[r"mlp\.c_fc\.weight", ["fsdp", None]], [r"wpe", []]],
    # Megatron-style: GPT-2's Conv1D weights are (in, out); column-parallel in, row-parallel out.
    "1x2x2": [[r"(c_attn|c_fc)\.weight", ["fsdp", "tensor"]], [r"c_proj\.weight", ["tensor", "fsdp"]]],
}
EXPECTED = {
    "4x1x1": {"transformer.wte.weight": "{replicated}", "transformer.h.0.ln_1.weight": "{replicated}",
              "transformer.h.0.mlp.c_fc.weight": "{replicated}", "transformer.wpe.weight": "{replicated}"},
    "2x2x1": {"transformer.wte.weight": "{devices=[2,1,2]0,2,1,3 last_tile_dim_replicate}",
              "transformer.h.0.ln_1.weight": "{devices=[2,2]0,2,1,3 last_tile_dim_replicate}",
              "transformer.h.0.mlp.c_fc.weight": "{devices=[2,1,2]0,2,1,3 last_tile_dim_replicate}",
              "transformer.h.0.mlp.c_proj.weight": "{devices=[2,1,2]0,2,1,3 last_tile_dim_replicate}",
              "transformer.wpe.weight": "{replicated}"},
    "1x4x1": {"transformer.wte.weight": "{devices=[4,1]0,1,2,3}", "transformer.h.0.ln_1.weight": "{devices=[4]0,1,2,3}",
              "transformer.h.0.mlp.c_fc.weight": "{devices=[1,4]0,1,2,3}",
              "transformer.wpe.weight": "{devices=[1,4]0,1,2,3}"},
    "1x2x2": {"transformer.h.0.mlp.c_fc.weight": "{devices=[2,2]0,1,2,3}",
              "transformer.h.0.mlp.c_proj.weight": "{devices=[2,2]0,2,1,3}"},
}


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_mesh_training_matches_torch_backend(tmp_path, torch_reference, mesh_name):
    import torch_xla.distributed.spmd as xs

    rules = RULES.get(mesh_name)
    probe = _StepProbe()
    trainer = xtrainer.Trainer(model=tiny_gpt2(), args=_args(tmp_path, "torch_xla", MESHES[mesh_name], sharding_rules=rules),
                               train_dataset=DATA, callbacks=[probe])
    backend = trainer.backend
    assert backend.local_batch_devices == _batch_devices(MESHES[mesh_name])
    assert backend.mesh_config.shape == tuple(int(s) for s in mesh_name.split("x"))
    trainer.train()

    # The loss curve (6 steps; steps 3 and 6 have a short batch of 4, padded to 8) equals torch's.
    assert len(_losses(trainer)) == 6
    np.testing.assert_allclose(_losses(trainer), _losses(torch_reference), rtol=0, atol=1e-4)
    np.testing.assert_allclose(_grad_norms(trainer), _grad_norms(torch_reference), rtol=0, atol=1e-4)
    # trainer.model is the user's CPU module, holding the trained weights.
    assert all(p.device.type == "cpu" for p in trainer.model.parameters())
    assert trainer.model.lm_head.weight is trainer.model.transformer.wte.weight
    _assert_close_weights(torch_reference.model, trainer.model, atol=1e-4)

    # Parameters (and their Adam moments) are sharded as the rules say; ties survive placement.
    device_model = backend.model
    params = dict(device_model.named_parameters())
    for name, expected in EXPECTED.get(mesh_name, {}).items():
        assert _sharding(params[name]) == expected, name
    for name, param in params.items():
        marked = torch.zeros(param.shape).to(torch_xla.device())
        xs.mark_sharding(marked, backend.mesh, backend.param_specs[name])
        assert _sharding(param) == _sharding(marked), name
        moments = trainer._backend_state.optimizer.state[param]
        assert _sharding(moments["exp_avg"]) == _sharding(param), name
    assert device_model.lm_head.weight is device_model.transformer.wte.weight

    # Two graphs (the first step also creates the optimizer state), then no compilation, although
    # steps 3 and 6 had short batches; fewer when an earlier test compiled the same graphs.
    assert [e["step"] for e in backend.compile_events] == [1, 2]
    assert probe.compiles[2:] == [0] * 4 and all(c <= 1 for c in probe.compiles[:2])
    # No device -> host transfer inside any step (the front reads the loss only when it logs).
    assert probe.reads == [0] * 6


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    mesh = MESHES["2x2x1"]
    args = _args(tmp_path / "run", "torch_xla", mesh, save_strategy="steps", save_steps=3)
    full = xtrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=DATA)
    full.train()
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(
        os.listdir(ckpt))
    optim_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert all(v.device.type == "cpu" for s in optim_state["state"].values() for v in s.values())

    resumed = xtrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=DATA)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == list(range(1, 7))
    np.testing.assert_allclose(_losses(resumed, 3), _losses(full, 3), rtol=1e-6, atol=1e-6)
    _assert_close_weights(full.model, resumed.model, atol=1e-6)
    # Moments reloaded from optimizer.pt get their parameter's sharding back.
    params = dict(resumed.backend.model.named_parameters())
    wte = params["transformer.wte.weight"]
    assert _sharding(resumed._backend_state.optimizer.state[wte]["exp_avg"]) == _sharding(wte)

    # The layout is the torch backend's: it resumes the torch_xla checkpoint and continues the same curve.
    other = xtrainer.Trainer(model=tiny_gpt2(), args=_args(tmp_path / "torch", "torch"), train_dataset=DATA)
    other.train(resume_from_checkpoint=str(ckpt))
    np.testing.assert_allclose(_losses(other, 3), _losses(full, 3), rtol=0, atol=1e-4)

    # save_model writes what transformers loads.
    full.save_model(str(tmp_path / "final"))
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "final"))
    _assert_close_weights(full.model, loaded, atol=0)


def test_bf16_trains(tmp_path, torch_reference):
    trainer = xtrainer.Trainer(model=tiny_gpt2(), args=_args(tmp_path, "torch_xla", MESHES["4x1x1"], bf16=True),
                               train_dataset=DATA)
    trainer.train()
    losses = _losses(trainer)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights
    np.testing.assert_allclose(losses, _losses(torch_reference), rtol=0, atol=3e-2)  # bf16 matmuls: loose


def test_recompilation_guard_names_the_cause(tmp_path, monkeypatch):
    from xtrainer.backends.torch_xla.backend import XlaRecompilationError

    monkeypatch.setenv("XTRAINER_XLA_PAD_BATCHES", "0")
    monkeypatch.setenv("XTRAINER_XLA_MAX_GRAPHS", "2")
    monkeypatch.setenv("XTRAINER_XLA_ON_RECOMPILE", "raise")
    trainer = xtrainer.Trainer(model=tiny_gpt2(), args=_args(tmp_path, "torch_xla", MESHES["4x1x1"]), train_dataset=DATA)
    with pytest.raises(XlaRecompilationError, match=r"'input_ids' \(8, 16\) int64 -> \(4, 16\) int64"):
        trainer.train()
    # The third step (the short batch, 4 rows) made the third graph; it raised before being counted.
    assert trainer.state.global_step == 2
    assert [e["step"] for e in trainer.backend.compile_events] == [1, 2, 3]
    assert "optimizer state" in trainer.backend.compile_events[1]["cause"]


def test_evaluation_pads_and_cuts_short_batches_llama(tmp_path):
    """Llama, with an attention_mask; the eval set's last batch is short (20 = 8 + 8 + 4)."""
    data = [{**row, "attention_mask": [1] * 16} for row in DATA]
    runs = {}
    for backend, mesh in (("torch", None), ("torch_xla", MESHES["2x2x1"])):
        trainer = xtrainer.Trainer(model=tiny_llama(), args=_args(tmp_path / backend, backend, mesh, num_train_epochs=1),
                                   train_dataset=data, eval_dataset=data)
        before = trainer.evaluate()["eval_loss"]  # before train(): the backend evaluates the model as given
        trainer.train()
        metrics = trainer.evaluate()
        predictions = trainer.predict(data)
        runs[backend] = (trainer, metrics, predictions, before)
    (ref, ref_metrics, ref_pred, ref_before), (xla, xla_metrics, xla_pred, xla_before) = runs["torch"], runs["torch_xla"]
    assert xla_before == pytest.approx(ref_before, abs=1e-5)
    np.testing.assert_allclose(_losses(xla), _losses(ref), rtol=0, atol=1e-4)
    assert xla_metrics["eval_loss"] == pytest.approx(ref_metrics["eval_loss"], abs=1e-4)
    assert xla_pred.predictions.shape == ref_pred.predictions.shape == (20, 16, 64)
    np.testing.assert_allclose(xla_pred.predictions, ref_pred.predictions, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(xla_pred.label_ids, ref_pred.label_ids)


def test_user_optimizer_float_labels_and_scalar_parameters(tmp_path):
    """A model of two 0-d parameters with float labels (never padded) and an optimizer built over the
    CPU model's parameters, which the backend points at the device copies."""
    data = regression_data(20)
    runs = []
    for backend in ("torch", "torch_xla"):
        model = RegressionModel()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)  # no fused kernel on XLA: plain AdamW
        trainer = xtrainer.Trainer(model=model, args=_args(tmp_path / backend, backend, MESHES["4x1x1"] if backend != "torch" else None,
                                                           max_steps=5), train_dataset=data, optimizers=(optimizer, None))
        trainer.train()
        runs.append(trainer)
    np.testing.assert_allclose(_losses(runs[1]), _losses(runs[0]), rtol=1e-5)
    assert float(runs[1].model.a.detach()) == pytest.approx(float(runs[0].model.a.detach()), rel=1e-5)


def _varlen_data(n=20, vocab=64, seed=3):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(6, 17))
        ids = rng.integers(1, vocab, size=length)
        rows.append({"input_ids": ids.tolist(), "labels": ids.tolist()})
    return rows


def _pad_to_longest(features):
    """A dynamic-padding collator: every batch is as long as its longest example."""
    longest = max(len(f["input_ids"]) for f in features)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        pad = longest - len(f["input_ids"])
        out["input_ids"].append(f["input_ids"] + [0] * pad)
        out["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        out["labels"].append(f["labels"] + [-100] * pad)
    return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


def test_accumulation_and_dynamic_lengths_match_torch_with_static_graphs(tmp_path):
    """gradient_accumulation_steps=2 over batches of 8, 8, 4 (windows of 2 and 1 micro-batches), each
    batch padded by the collator to its own longest example: torch_xla pads rows and sequence
    positions (to 16) so the graphs stay fixed, and still trains exactly like torch."""
    data = _varlen_data()
    runs = {}
    for backend in ("torch", "torch_xla"):
        probe = _StepProbe()
        trainer = xtrainer.Trainer(model=tiny_gpt2(seed=5), args=_args(tmp_path / backend, backend, MESHES["4x1x1"] if backend != "torch" else None,
                                                                       gradient_accumulation_steps=2, num_train_epochs=3),
                                   train_dataset=data, data_collator=_pad_to_longest, callbacks=[probe])
        trainer.train()
        runs[backend] = (trainer, probe)
    (ref, _), (xla, probe) = runs["torch"], runs["torch_xla"]
    assert len(_losses(xla)) == 6
    np.testing.assert_allclose(_losses(xla), _losses(ref), rtol=0, atol=1e-4)
    _assert_close_weights(ref.model, xla.model, atol=1e-4)
    # Two kinds of window (2 micro-batches, then the epoch's last of 1), each first seen with and then
    # without a fresh optimizer state at most: every later step reuses a compiled graph.
    assert len(xla.backend._seen) <= 4
    assert probe.compiles[3:] == [0] * 3


def test_recompilation_guard_warns_by_default(tmp_path):
    """Past xla_max_graphs the default is a warning naming the change (no compilation needed to check it)."""
    from xtrainer.backends.torch_xla.backend import XlaOptions
    from xtrainer.backends.torch_xla.static_shapes import batch_signature

    trainer = xtrainer.Trainer(model=RegressionModel(), args=_args(tmp_path, "torch_xla", MESHES["4x1x1"], max_steps=1))
    backend = trainer.backend
    assert backend.options == XlaOptions()  # pad, pow2 buckets, 8 graphs, warn
    backend.options = XlaOptions(max_graphs=1)
    backend.init_state(1, backend.create_optimizer(backend.optimizer_target()), None)

    def signature(rows, ready):
        return ((batch_signature({"input_x": np.zeros(rows, np.float32), "labels": np.zeros(rows, np.float32)}),), False, ready)

    backend._check_recompilation(1, signature(8, False))
    backend._check_recompilation(0, signature(8, False))  # seen before, nothing compiled: nothing to say
    with pytest.warns(RuntimeWarning, match=r"more than xla_max_graphs=1.*'input_x' \(8,\) float32 -> \(3,\) float32"):
        backend._check_recompilation(1, signature(3, False))
    with pytest.warns(RuntimeWarning, match="although the input shapes did not"):
        backend._check_recompilation(1, signature(3, False))  # same shapes, yet a new graph
