#!/usr/bin/env bash
# The quick start: train the tiny BitNet b1.58 on the embedded corpus (CPU, about two minutes).
# Extra arguments go to bitnet-train, e.g. scripts/quickstart.sh --num-steps 50
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
RUN_ID="quickstart_$(date +%Y%m%d-%H%M%S)"
bitnet-train --preset tiny --data embedded --run-id "$RUN_ID" "$@"
bitnet-status "runs/$RUN_ID"
