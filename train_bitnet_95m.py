#!/usr/bin/env python3
"""The seed's training script, from the repository root: python train_bitnet_95m.py [flags]
(the same tool as `bitnet-train`; scripts/train_bitnet_95m.py is its copy under scripts/)."""
import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parent / "scripts" / "train_bitnet_95m.py"), run_name="__main__")
