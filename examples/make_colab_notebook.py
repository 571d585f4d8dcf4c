"""Writes examples/colab_tpu.ipynb (outputs empty). Edit the cells here, then run:

    python examples/make_colab_notebook.py

The notebook is a Colab TPU (v5e-1) walk-through: install xtrainer without touching the runtime's
jax/libtpu/torch/torch_xla, pick the v5e-1 preset, train the reference Flax Llama on the JAX
backend, train a transformers torch model on the same TPU through torchax, plot both loss curves.
With XTRAINER_NOTEBOOK_SMOKE=1 (tests/examples/test_colab_notebook.py) it installs nothing, uses a
tiny config, and runs on CPU from the checkout.
"""

from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """\
# xtrainer on a Colab TPU (v5e-1)

xtrainer is the Hugging Face `Trainer` API with JAX/XLA-first backends. This notebook

1. installs xtrainer **without replacing** the runtime's `jax`, `libtpu`, `torch` or `torch_xla`,
2. shows the TPU devices and picks the `v5e-1` preset (`tpu_configs/v5e-1.yaml`),
3. trains xtrainer's reference Flax Llama on the **JAX backend** and reloads its export with transformers,
4. trains a **transformers (torch) GPT-2** on the same TPU through **torchax** (JAX backend),
5. plots both loss curves.

Runtime: *Runtime → Change runtime type → v5e-1 TPU*. The full run takes a few minutes.

The cells read two environment variables: `XTRAINER_NOTEBOOK_SMOKE=1` (the test suite: install
nothing, tiny config, CPU) and `XTRAINER_NOTEBOOK_OUTPUT` (where runs and the plot go)."""),
    ("md", """\
## 1. Install

Colab's TPU runtime ships `jax`, `jaxlib`, `libtpu`, `torch` and `torch_xla` built to work with
each other and with the TPU driver. A plain `pip install xtrainer[jax]` could pull a newer `jax`
(and a `jaxlib`/`libtpu` that no longer matches), or a CUDA `torch` wheel. So the cell

- records the versions that are installed now and passes them to pip as **constraints** (`-c`):
  pip may add missing packages (flax, optax, orbax, transformers, torchax, ...) but must choose
  versions that work with the pinned ones; when none exists it **fails** instead of replacing them;
- afterwards checks that every pinned package still has its old version.

`--no-deps` alone would also protect them, but then you would have to list every small dependency
by hand. Set `XTRAINER_SOURCE` to where you get xtrainer from, as a URL pip accepts after `@`:
`git+https://github.com/<you>/xtrainer.git`, or `file:///content/xtrainer` for a copy you uploaded."""),
    ("code", """\
import os, subprocess, sys, tempfile
from importlib import metadata

SMOKE = os.environ.get("XTRAINER_NOTEBOOK_SMOKE") == "1"
XTRAINER_SOURCE = os.environ.get("XTRAINER_SOURCE", "git+https://github.com/xtrainer/xtrainer.git")  # edit me
PINNED = ("jax", "jaxlib", "libtpu", "libtpu-nightly", "torch", "torch_xla", "torchvision", "numpy")

def installed_versions():
    found = {}
    for name in PINNED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found

before = installed_versions()
if SMOKE:
    print("smoke run from a source checkout: nothing installed. Present:", before)
else:
    constraints = os.path.join(tempfile.gettempdir(), "xtrainer-constraints.txt")
    with open(constraints, "w") as f:
        f.write("\\n".join(f"{name}=={version}" for name, version in before.items()) + "\\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", constraints,
                    f"xtrainer[jax,torch] @ {XTRAINER_SOURCE}", "torchax"], check=True)
    after = installed_versions()
    changed = {name: (before[name], after.get(name)) for name in before if after.get(name) != before[name]}
    assert not changed, f"the install changed preinstalled packages: {changed}"
    print("xtrainer installed; preinstalled packages unchanged:", after)"""),
    ("md", """\
## 2. The preset and the devices

A preset describes the slice (chips, devices, hosts) and its default mesh. libtpu reads its
environment once, when the TPU runtime starts, so `apply_env()` runs **before** jax is imported
(on a v5e-1 it only sets `PJRT_DEVICE=TPU`). `TrainingArguments(tpu_config="v5e-1")` then makes the
JAX backend check that it finds exactly the devices the preset describes."""),
    ("code", """\
from xtrainer.tpu_presets import load_preset

PRESET = os.environ.get("XTRAINER_TPU_CONFIG", "v5e-1")
preset = load_preset(PRESET)
if not SMOKE:
    preset.apply_env()
print(preset.summary())
print("suggested batch sizes:", preset.batch)

import jax
ON_TPU = jax.default_backend() == "tpu"
print("jax", jax.__version__, "on", jax.default_backend(), "devices:", jax.devices())"""),
    ("md", """\
## 3. Configuration and data

The model learns a synthetic language: each sequence counts upward modulo the vocabulary from a
random start with a random stride (1, 2 or 3), so after two tokens the rest is predictable and the
loss can fall far below ln(vocabulary). Smoke mode shrinks everything."""),
    ("code", """\
import numpy as np

if SMOKE:
    CFG = dict(vocab=64, hidden=32, layers=1, heads=2, intermediate=64, seq_len=16, batch=4, steps=12, examples=256)
else:
    CFG = dict(vocab=256, hidden=256, layers=4, heads=8, intermediate=1024, seq_len=128, batch=32, steps=300,
               examples=16384)
OUTPUT = os.environ.get("XTRAINER_NOTEBOOK_OUTPUT") or ("/content/xtrainer-runs" if os.path.isdir("/content")
                                                         else tempfile.mkdtemp(prefix="xtrainer-notebook-"))
os.makedirs(OUTPUT, exist_ok=True)

def stride_data(n, seq_len, vocab, seed):
    rng = np.random.default_rng(seed)
    starts, strides = rng.integers(0, vocab, size=n), rng.integers(1, 4, size=n)
    rows = []
    for start, stride in zip(starts, strides):
        ids = ((start + stride * np.arange(seq_len)) % vocab).astype(np.int64)
        rows.append({"input_ids": ids, "labels": ids.copy()})
    return rows

train_data = stride_data(CFG["examples"], CFG["seq_len"], CFG["vocab"], seed=1)
eval_data = stride_data(64, CFG["seq_len"], CFG["vocab"], seed=2)
print(CFG, "->", OUTPUT)"""),
    ("md", """\
## 4. The reference Flax Llama on the JAX backend

One jitted step per optimizer step, on the preset's mesh. On the TPU the model computes in
bfloat16 (parameters and optimizer state stay float32). `save_model` writes `config.json` +
`model.safetensors`, which `transformers.LlamaForCausalLM.from_pretrained` loads."""),
    ("code", """\
import math
import jax.numpy as jnp
import transformers
from flax import nnx

from xtrainer import Trainer, TrainingArguments
from xtrainer.models import LlamaConfig, LlamaForCausalLM

def training_args(name):
    steps = CFG["steps"]
    return TrainingArguments(
        output_dir=os.path.join(OUTPUT, name), backend="jax", tpu_config=PRESET, max_steps=steps,
        per_device_train_batch_size=CFG["batch"], per_device_eval_batch_size=CFG["batch"],
        learning_rate=3e-3, warmup_steps=0.1, lr_scheduler_type="cosine", logging_steps=max(1, steps // 30),
        eval_strategy="steps", eval_steps=max(1, steps // 2), save_strategy="no", report_to="none",
        disable_tqdm=SMOKE, seed=0)

llama_config = transformers.LlamaConfig(
    vocab_size=CFG["vocab"], hidden_size=CFG["hidden"], intermediate_size=CFG["intermediate"],
    num_hidden_layers=CFG["layers"], num_attention_heads=CFG["heads"], num_key_value_heads=CFG["heads"] // 2,
    max_position_embeddings=CFG["seq_len"], tie_word_embeddings=False)
llama = LlamaForCausalLM(LlamaConfig.from_hf(llama_config, dtype=jnp.bfloat16 if ON_TPU else jnp.float32),
                         rngs=nnx.Rngs(0))
llama_trainer = Trainer(model=llama, args=training_args("llama-jax"), train_dataset=train_data, eval_dataset=eval_data)
llama_result = llama_trainer.train()
llama_eval = llama_trainer.evaluate()
print(f"train loss {llama_result.training_loss:.3f}, eval loss {llama_eval['eval_loss']:.3f} "
      f"(untrained about ln({CFG['vocab']}) = {math.log(CFG['vocab']):.2f})")

export_dir = os.path.join(OUTPUT, "llama-jax", "export")
llama_trainer.save_model(export_dir)
import torch
reloaded = transformers.LlamaForCausalLM.from_pretrained(export_dir)
with torch.no_grad():
    prompt = torch.tensor([[5, 7, 9, 11]])
    print("reloaded with transformers; after 5 7 9 11 it predicts", int(reloaded(prompt).logits[0, -1].argmax()))"""),
    ("md", """\
## 5. A transformers torch model on the same TPU, through torchax

`backend="jax"` also trains a `torch.nn.Module`: torchax runs its forward on JAX arrays inside the
same jitted step. A transformers GPT-2 trains here on the TPU that JAX already holds.

Why not `backend="torch_xla"` in this notebook? JAX and torch_xla each open the TPU through their
own libtpu runtime, and one process cannot hold it twice. To use torch_xla, restart the runtime and
use it *instead of* JAX (e.g. `!python examples/run_clm.py --backend torch_xla` from a fresh runtime,
with the repository cloned). The cell is skipped when torchax is not installed."""),
    ("code", """\
import importlib.util

gpt2_trainer = None
if importlib.util.find_spec("torchax") is None:
    print("torchax is not installed: skipping the torch-model section")
else:
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=CFG["vocab"], n_positions=CFG["seq_len"], n_embd=CFG["hidden"], n_layer=CFG["layers"],
        n_head=CFG["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    gpt2_trainer = Trainer(model=gpt2, args=training_args("gpt2-torchax"), train_dataset=train_data,
                           eval_dataset=eval_data)
    gpt2_result = gpt2_trainer.train()
    print(f"GPT-2 (torch, via torchax on {jax.default_backend()}): train loss {gpt2_result.training_loss:.3f}, "
          f"eval loss {gpt2_trainer.evaluate()['eval_loss']:.3f}")
    gpt2_trainer.save_model(os.path.join(OUTPUT, "gpt2-torchax", "export"))"""),
    ("md", "## 6. Loss curves"),
    ("code", """\
import json
import matplotlib
import matplotlib.pyplot as plt

def loss_curve(trainer):
    points = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
    return [p[0] for p in points], [p[1] for p in points]

curves = {"reference Llama (Flax, jax)": loss_curve(llama_trainer)}
if gpt2_trainer is not None:
    curves["GPT-2 (torch via torchax, jax)"] = loss_curve(gpt2_trainer)
fig, ax = plt.subplots(figsize=(7, 4))
for label, (steps, losses) in curves.items():
    ax.plot(steps, losses, marker="o", markersize=3, label=label)
ax.set_xlabel("step"); ax.set_ylabel("training loss"); ax.set_yscale("log"); ax.legend(); ax.grid(alpha=0.3)
ax.set_title(f"xtrainer on {jax.default_backend()} ({PRESET})")
plot_path = os.path.join(OUTPUT, "loss_curve.png")
fig.savefig(plot_path, dpi=100, bbox_inches="tight")
with open(os.path.join(OUTPUT, "summary.json"), "w") as f:
    json.dump({"backend": jax.default_backend(), "preset": PRESET, "curves": curves}, f)
print("saved", plot_path)
plt.show()"""),
]


def build_notebook() -> nbformat.NotebookNode:
    """The notebook object, with empty outputs and a python3 kernelspec."""
    cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    nb = new_notebook(cells=cells)
    nb.metadata.update({
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "accelerator": "TPU",
        "colab": {"provenance": [], "gpuType": "V5E1"},
    })
    return nb


def main() -> str:
    """Writes colab_tpu.ipynb next to this script; returns its path."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "colab_tpu.ipynb")
    nb = build_notebook()
    nbformat.validate(nb)
    with open(path, "w") as f:
        nbformat.write(nb, f)
    return path


if __name__ == "__main__":
    print("wrote", main())
