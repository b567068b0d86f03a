#!/usr/bin/env bash
# The test suite (CPU): creates/reuses .venv (or $BITNET_VENV) with the test tools (the [dev] extra:
# pytest, transformers, datasets, matplotlib, tensorboard), then runs pytest. Arguments go to pytest.
# Without arguments it also runs the Triton kernels against their fallbacks on Triton's CPU
# interpreter (TRITON_INTERPRET=1). triton 3.6 (the GPU machines' version) needs numpy < 2.4 there,
# so both go into a folder of their own, .triton-interp/ (or $BITNET_TRITON_DIR), put on PYTHONPATH
# for that pass only: the venv itself keeps its numpy and gets no triton.
set -euo pipefail
export BITNET_EXTRAS=dev
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
source "$ROOT/scripts/export_tools.sh"  # lm-eval, and llama-cpp-python from a cached wheel (opt-in build)
# pytest-xdist: one worker per core, at most 4 ($BITNET_TEST_WORKERS overrides; 0: one process). On the
# 2-core CI machine two workers take the suite from 6.5 to about 4 min. Each worker that runs a test of
# tests/faults starts that folder's background scenarios (its conftest): duplicated work, yet keeping the
# folder on one worker (--dist loadgroup) measured slower (4.5 min against 3.9).
WORKERS="${BITNET_TEST_WORKERS:-$(nproc 2>/dev/null || echo 1)}"
if (( WORKERS > 4 )); then WORKERS=4; fi
python -m pytest -q -n "$WORKERS" "$@"
if [[ $# -eq 0 ]]; then
  TRITON_DIR="${BITNET_TRITON_DIR:-$ROOT/.triton-interp}"
  if ! PYTHONPATH="$TRITON_DIR" python -c "import triton" 2>/dev/null; then
    echo "run_tests: installing triton 3.6.0 and numpy<2.4 into $TRITON_DIR (for the interpreter pass only)"
    pip install -q --target "$TRITON_DIR" "triton==3.6.0" "numpy<2.4"
  fi
  # triton's interpreter raises numpy/torch deprecation warnings that are not ours
  PYTHONPATH="$TRITON_DIR" TRITON_INTERPRET=1 python -m pytest -q -W ignore::DeprecationWarning tests/model/kernels
fi
