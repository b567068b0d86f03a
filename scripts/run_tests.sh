#!/usr/bin/env bash
# The test suite (CPU, a few minutes): creates/reuses .venv, then runs pytest. Arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
python -m pytest -q "$@"
