#!/usr/bin/env bash
# One-shot GPU check: tokens/s and MFU (vs the card's dense bf16 peak) of xtrainer's JAX backend on
# the small config and a ~350M-parameter Llama (bench/gpu_check.py). Extra arguments go to the script,
# e.g. `bash bench/gpu_check.sh --torch` adds xtrainer's torch backend on the same configs.
#
# Python: $XTRAINER_GPU_PYTHON if set, else python3 if its jax sees a GPU, else a venv built once
# under ~/.cache/xtrainer-venvs/gpu with jax[cuda12] and the main lane's other pins (needs PyPI).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
has_gpu_jax() { "$1" -c "import jax, sys; sys.exit(0 if jax.devices()[0].platform in ('gpu', 'tpu') else 1)" 2>/dev/null; }
py="${XTRAINER_GPU_PYTHON:-}"
if [ -z "$py" ]; then
  if command -v python3 >/dev/null && has_gpu_jax python3 && python3 -c "import flax, optax, transformers" 2>/dev/null; then
    py=python3
  else
    venv="${XTRAINER_VENV_CACHE:-$HOME/.cache/xtrainer-venvs}/gpu"
    if [ ! -f "$venv/.complete" ]; then
      echo "[gpu_check] building $venv (jax[cuda12] + the main lane's pins; needs PyPI)" >&2
      rm -rf "$venv" && python3 -m venv "$venv"
      "$venv/bin/python" -m pip install --quiet --upgrade pip
      jax_version="$(grep -E '^jax==' "$root/requirements/main.txt" | cut -d= -f3)"
      grep -vE '^(jax|jaxlib|torch)==' "$root/requirements/main.txt" | grep -vE '^\s*#' > "$venv/req.txt"
      "$venv/bin/python" -m pip install --quiet "jax[cuda12]==$jax_version" torch -r "$venv/req.txt"
      touch "$venv/.complete"
    fi
    py="$venv/bin/python"
  fi
fi
has_gpu_jax "$py" || { echo "[gpu_check] $py: jax sees no GPU/TPU (jax.devices() = $("$py" -c 'import jax; print(jax.devices())' 2>&1 | tail -1))" >&2; exit 1; }
"$py" -c "import jax; print('[gpu_check] jax', jax.__version__, jax.devices())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
cd "$root" && PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$py" bench/gpu_check.py "$@"
