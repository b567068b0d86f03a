#!/usr/bin/env bash
# The seed's 10-step test, run from the repository root; the script itself is scripts/test_training_10steps.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/scripts/test_training_10steps.sh" "$@"
