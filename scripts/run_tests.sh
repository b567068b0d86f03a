#!/usr/bin/env bash
# The test suite (CPU, a few minutes): creates/reuses .venv, then runs pytest. Arguments go to pytest.
# Without arguments it also runs the Triton kernels against their fallbacks on Triton's CPU
# interpreter (TRITON_INTERPRET=1), installing triton into the test venv where it is missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
source "$ROOT/scripts/export_tools.sh"  # lm-eval, and llama-cpp-python from a cached wheel (opt-in build)
python -m pytest -q "$@"
if [[ $# -eq 0 ]]; then
  # triton 3.6 is the GPU machines' version; its interpreter trips on numpy 2.4's scalar conversion.
  python -c "import triton" 2>/dev/null || pip install -q "triton==3.6.0" "numpy<2.4"
  TRITON_INTERPRET=1 python -m pytest -q tests/model/kernels
fi
