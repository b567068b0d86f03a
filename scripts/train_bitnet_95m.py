#!/usr/bin/env python3
"""The seed's familiar entry point: the 95M BitNet b1.58 run (FineWeb-Edu, 400k steps).

    python train_bitnet_95m.py                    # the full recipe: the 95m preset's defaults
    python train_bitnet_95m.py --no-eval --run-id my_run
Every flag of `bitnet-train --help` works here. The preset is 95m unless --preset, the --config
file or the checkpoint of --resume-from names another (the same layering as bitnet-train).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this clone's code, installed or not

from bitnet.cli.train import train_main  # noqa: E402

if __name__ == "__main__":
    # No --preset is injected: TrainConfig's default preset is 95m, and a preset from a config file or
    # a resumed checkpoint must win over that default.
    sys.exit(train_main(sys.argv[1:], prog="train_bitnet_95m.py"))
