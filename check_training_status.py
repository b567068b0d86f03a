#!/usr/bin/env python3
"""The seed's status checker, from the repository root: python check_training_status.py runs/<id>
(the same tool as `bitnet-status`; scripts/check_training_status.py is its copy under scripts/)."""
import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parent / "scripts" / "check_training_status.py"), run_name="__main__")
