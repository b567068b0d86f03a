#!/usr/bin/env bash
# The seed's 10-step test (./test_training_10steps.sh from the repository root): ten real training
# steps of the tiny preset on the embedded corpus, checkpoints at 0, 5 and 10 (and 4, the step before
# the stage boundary at 5, a milestone like the seed's step_029999), eval, samples and
# ternary stats at 5 and 10. Then it checks what the seed says it verifies: config, provenance and
# dataset fingerprint; checkpoints that load; samples in all three modes with their metrics; the
# ternary metrics; the status checker reading the run; and a git status the run left unchanged.
# Exit 0 only if every check passes; any failure prints FAIL and exits 1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
RUNS="${RUNS_DIR:-$ROOT/runs}"
RUN_ID="${RUN_ID:-test_10steps}"
RUN="$RUNS/$RUN_ID"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
fail() { echo "FAIL: $*" >&2; exit 1; }

# The trainer and the status tool must import before ten minutes of anything are spent.
"$PY" -c "import bitnet.cli, bitnet.status" \
  || fail "cannot import bitnet.cli / bitnet.status with $PY (install with scripts/quickstart.sh, or set PYTHON)"

in_git=0
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  in_git=1
  git_before="$(git -C "$ROOT" status --porcelain)"
fi

"$PY" -m bitnet.cli --preset tiny --data embedded --run-id "$RUN_ID" --runs-dir "$RUNS" --overwrite \
  --num-steps 10 --batch-size 4 --seq-len 64 --log-interval 1 --checkpoint-interval 5 \
  --eval-interval 5 --eval-sequences 8 --sample-interval 5 --sample-max-tokens 16 --quant-interval 5 --quiet \
  || fail "training exited with status $?"

"$PY" "$ROOT/scripts/check_run_tree.py" "$RUN" --steps 10 --checkpoints 0,4,5,10 --samples 5,10 \
  || fail "the run directory $RUN is incomplete (see the FAIL lines above)"

status_out="$("$PY" "$ROOT/check_training_status.py" "$RUN" 2>&1)" \
  || fail "the status checker failed on $RUN: $status_out"
grep -q "progress   step 10 / 10" <<<"$status_out" \
  || fail "the status checker did not report step 10 / 10 for $RUN:"$'\n'"$status_out"
echo "ok    status      check_training_status.py reads the run (step 10 / 10, FINISHED)"

if [[ $in_git -eq 1 ]]; then
  git_after="$(git -C "$ROOT" status --porcelain)"
  [[ "$git_before" == "$git_after" ]] \
    || fail "the run changed git status (artifacts outside ignored paths):"$'\n'"$(diff <(echo "$git_before") <(echo "$git_after"))"
  echo "ok    git         git status unchanged by the run (runs/ is ignored)"
else
  echo "note  git         $ROOT is not a git checkout: git status not checked"
fi
echo "OK: 10 steps, checkpoints at 0, 4, 5 and 10, every check passed: $RUN"
