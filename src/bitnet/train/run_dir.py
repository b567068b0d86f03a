"""Kept for bitnet.cli until it imports bitnet.run.directory (docs/design.md, "run directory")."""

from bitnet.run.directory import (base_run_id, check_run_dir, check_run_id, continuation_id,  # noqa: F401
                                  create_run_dir, default_run_id, live_run, lock_run_dir, run_family)
