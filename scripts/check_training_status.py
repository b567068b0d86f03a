#!/usr/bin/env python3
"""Show where a training run stands: text summary, --json, --plot OUT.png, --watch [SECONDS].

    python scripts/check_training_status.py runs/<id> --watch 30
"""
import sys
from pathlib import Path

try:
    from bitnet.cli.status import main
except ImportError:  # a fresh clone without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from bitnet.cli.status import main

if __name__ == "__main__":
    sys.exit(main())
