"""`xtrainer plan` of a transformers PyTorch model: an HF LlamaForCausalLM on the meta device (no weights)
compiled for a TPU preset through torchax, the jax backend's own train step (XLA lane: torchax + libtpu)."""

import importlib.util
import json

import pytest

pytest.importorskip("torchax")
if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu (the TPU compiler) is not installed: pip install 'xtrainer[plan]'", allow_module_level=True)

import torch  # noqa: E402
import transformers  # noqa: E402

import xtrainer  # noqa: E402
from xtrainer import cli  # noqa: E402

MICRO = dict(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
             vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False)


def test_an_hf_torch_llama_on_the_meta_device_is_planned_through_torchax(tmp_path):
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MICRO))
    args = xtrainer.TrainingArguments(str(tmp_path), backend="jax", report_to="none", bf16=True,
                                      per_device_train_batch_size=2)
    trainer = xtrainer.Trainer(model=model, args=args)
    report = trainer.plan("v5litepod-4", seq_len=64, output_dir="")
    assert report.parameters == sum(p.numel() for p in model.parameters())
    assert report.fits and report.devices == 4 and report.tokens_per_step == 4 * 2 * 64
    assert 0.95 <= report.flops_per_device / report.model_flops_per_device < 1.5
    weights = [t for t in report.tensors if t.kind == "param" and len(t.shape) == 2]
    assert weights and all("fsdp" in t.spec for t in weights)  # torch weights sharded by the same rules
    assert report.collectives["all-gather"]["count"] > 0
    assert "torch_xla" in report.route  # a single-host TPU run of a torch model takes torch_xla with "auto"
    assert all(p.is_meta for p in model.parameters())  # nothing was materialised


def test_cli_plans_the_torch_model_of_a_config(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MICRO))
    rc = cli.main(["plan", "--tpu-config", "v6e-1", "--model", str(path), "--torch", "--seq-len", "32",
                   "--output-dir", str(tmp_path / "out"), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    assert report["model"].startswith("LlamaForCausalLM") and report["fits"] and report["preset"] == "v6e-1"
