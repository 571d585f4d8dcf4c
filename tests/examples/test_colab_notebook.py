"""examples/colab_tpu.ipynb executed end to end with nbclient, on CPU, in smoke mode
(XTRAINER_NOTEBOOK_SMOKE=1: no install, tiny config). The kernel is this venv's python, registered
as a kernelspec in a temporary directory. The torch-model section runs where torchax is installed
(XLA lane) and is skipped by the notebook itself elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(REPO, "examples", "colab_tpu.ipynb")


def _kernel_manager(tmp_path, env: dict):
    """A KernelManager whose kernel is sys.executable with env, through a throwaway kernelspec."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "kernels" / "xtrainer-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "xtrainer test", "language": "python", "env": env,
    }))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="xtrainer-test", kernel_spec_manager=specs)


def test_notebook_is_generated_from_its_script():
    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        import make_colab_notebook
    finally:
        sys.path.pop(0)
    on_disk = nbformat.read(NOTEBOOK, as_version=4)
    fresh = make_colab_notebook.build_notebook()
    assert [c.source for c in on_disk.cells] == [c.source for c in fresh.cells], \
        "colab_tpu.ipynb is stale: run python examples/make_colab_notebook.py"
    assert all(not c.get("outputs") for c in on_disk.cells if c.cell_type == "code")
    assert on_disk.metadata["accelerator"] == "TPU"


def test_colab_notebook_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "runs"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env = {
        "XTRAINER_NOTEBOOK_SMOKE": "1",
        "XTRAINER_NOTEBOOK_OUTPUT": str(out),
        "PYTHONPATH": REPO,
        # One CPU device, as on a v5e-1, so the preset's device check passes; small programs compile
        # fastest unoptimised.
        "XLA_FLAGS": " ".join([*flags, "--xla_backend_optimization_level=0"]),
        "JAX_PLATFORMS": "cpu",
        "MPLBACKEND": "Agg",
        "HF_HUB_OFFLINE": "1",
    }
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path, env), timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "nothing installed" in text
    assert "v5litepod-1 (1x1): 1 chip, 1 device, 1 host" in text
    assert "on cpu devices: [CpuDevice(id=0)]" in text
    assert "reloaded with transformers" in text
    plot = out / "loss_curve.png"
    assert plot.exists() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "v5e-1" and summary["backend"] == "cpu"
    steps, losses = summary["curves"]["reference Llama (Flax, jax)"]
    assert steps[-1] == 12 and losses[-1] < losses[0]
    assert (out / "llama-jax" / "export" / "model.safetensors").exists()
    if importlib.util.find_spec("torchax") is not None:
        steps, losses = summary["curves"]["GPT-2 (torch via torchax, jax)"]
        assert steps[-1] == 12 and losses[-1] < losses[0]
        assert (out / "gpt2-torchax" / "export" / "config.json").exists()
    else:
        assert "skipping the torch-model section" in text
        assert list(summary["curves"]) == ["reference Llama (Flax, jax)"]
