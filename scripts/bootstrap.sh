#!/usr/bin/env bash
# Create or reuse ./.venv and install bitnet-train into it (sourced by quickstart.sh and run_tests.sh).
# On a machine without an NVIDIA GPU it installs a CPU build of torch, never the multi-GB CUDA one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BITNET_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VENV/bin/pip" install -q "torch>=2.5,<2.15"
  else
    # CPU-only: PyTorch's CPU wheel (2.13.0+cpu sorts above PyPI's CUDA 2.13.0), not the multi-GB
    # CUDA build. --retries 0: where that index is unreachable, pip falls back at once to the others.
    "$VENV/bin/pip" install -q --retries 0 "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
# Installs the package (editable) and its test tools; torch is already satisfied, so nothing CUDA comes in.
if ! "$VENV/bin/python" -c "import bitnet, pytest, datasets" 2>/dev/null \
   || [[ "$ROOT/pyproject.toml" -nt "$VENV/.bitnet-installed" ]]; then
  "$VENV/bin/pip" install -q -e "$ROOT[dev]"
  touch "$VENV/.bitnet-installed"
fi
export PATH="$VENV/bin:$PATH"
