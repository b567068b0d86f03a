#!/usr/bin/env bash
# The quick start: install the package and a CPU torch into ./.venv (or $BITNET_VENV), train the tiny
# BitNet b1.58 on the embedded corpus (CPU), then show the run's status, eval and samples.
# Extra arguments go to bitnet-train, e.g. scripts/quickstart.sh --num-steps 50
set -euo pipefail
export BITNET_EXTRAS=""
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
RUN_ID="quickstart_$(date +%Y%m%d-%H%M%S)"
bitnet-train --preset tiny --run-id "$RUN_ID" "$@"
bitnet-status "runs/$RUN_ID"
