#!/usr/bin/env python3
"""The seed's familiar entry point: the 95M BitNet b1.58 run (FineWeb-Edu, 400k steps).

    python scripts/train_bitnet_95m.py                    # the full recipe, defaults of the 95m preset
    python scripts/train_bitnet_95m.py --no-eval --run-id my_run
Every flag of `bitnet-train --help` works here; --preset defaults to 95m.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bitnet.cli.train import train_main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--preset" or a.startswith("--preset=") for a in argv):
        argv = ["--preset", "95m", *argv]
    sys.exit(train_main(argv))
