#!/usr/bin/env bash
# Builds (once) and prints the path of the virtual environment for one test lane.
#
# Usage: scripts/ensure_venv.sh main|xla
#
# The venv lives outside the clone, keyed by a hash of the lane's requirements file, so a second
# CI run on the same machine reuses it, and any change to the pins builds a fresh one. A marker
# file is written only after a complete install, so an interrupted build is never reused.
set -euo pipefail
lane="${1:?usage: ensure_venv.sh main|xla}"
root="$(cd "$(dirname "$0")/.." && pwd)"
req="$root/requirements/$lane.txt"
[ -f "$req" ] || { echo "unknown lane '$lane': no $req" >&2; exit 2; }
hash="$(sha256sum "$req" | cut -c1-16)"
cache="${XTRAINER_VENV_CACHE:-$HOME/.cache/xtrainer-venvs}"
venv="$cache/$lane-$hash"
mkdir -p "$cache"
# One build at a time per venv: a second caller waits for the first instead of deleting its work.
exec 9>"$venv.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  echo "[ensure_venv] building the $lane lane venv at $venv" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  # pip warns once per package about this machine's empty extra index folders; keep the log readable.
  quiet() { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }
  "$venv/bin/python" -m pip install --quiet --upgrade pip 2>&1 | quiet
  "$venv/bin/python" -m pip install --quiet -r "$req" 2>&1 | quiet
  "$venv/bin/python" -c "import torch, jax, transformers" >&2
  touch "$venv/.complete"
fi
echo "$venv"
