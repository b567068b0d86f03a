#!/usr/bin/env bash
# Ten real training steps (tiny preset, embedded corpus), checkpoints at 5 and 10, then checks the
# run directory's tree and that the status tool reads it. Exit 0 only if every file is there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
RUNS="${RUNS_DIR:-$ROOT/runs}"
RUN_ID="${RUN_ID:-test_10steps}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m bitnet.cli --preset tiny --data embedded --run-id "$RUN_ID" --runs-dir "$RUNS" --overwrite \
  --num-steps 10 --batch-size 4 --seq-len 64 --log-interval 1 --checkpoint-interval 5 \
  --eval-interval 5 --eval-sequences 8 --sample-interval 5 --quiet
RUN="$RUNS/$RUN_ID"
missing=0
for f in meta/config.json meta/provenance.json meta/dataset_fingerprint.json \
         checkpoints/step_000005/checkpoint.pt checkpoints/step_000005/meta.json \
         checkpoints/step_000010/checkpoint.pt checkpoints/step_000010/meta.json \
         metrics/scalars.jsonl eval/eval_results.jsonl; do
  if [[ ! -s "$RUN/$f" ]]; then echo "MISSING: $RUN/$f"; missing=1; fi
done
rows=$(wc -l < "$RUN/metrics/scalars.jsonl")
[[ "$rows" -eq 10 ]] || { echo "expected 10 scalar rows, found $rows"; missing=1; }
[[ -d "$RUN/samples" && -d "$RUN/anomalies" ]] || { echo "MISSING: samples/ or anomalies/"; missing=1; }
if "$PY" -c "import bitnet.status" 2>/dev/null; then
  "$PY" -m bitnet.cli.status "$RUN" >/dev/null || { echo "status tool failed on $RUN"; missing=1; }
fi
[[ $missing -eq 0 ]] && echo "OK: 10 steps, checkpoints at 5 and 10, run directory complete: $RUN"
exit $missing
