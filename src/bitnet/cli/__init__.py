"""The five console scripts, one module each (docs/design.md, section "command-line tools").

    bitnet-train         cli/train.py     (also `python -m bitnet.cli` and `python -m bitnet.train`)
    bitnet-status        cli/status.py    (standard library only, like bitnet/status.py)
    bitnet-generate      cli/generate.py
    bitnet-export        cli/export.py
    bitnet-prepare-data  cli/prepare.py
Each holds argument parsing and calls into the library. They share one parser class (args.py: bad
input is one `error: ...` line, exit 2), one device picker (bitnet/device.py, which the training loop uses too) and one model-from-checkpoint
loader (load.py). This file imports nothing, so the stdlib-only status tool stays stdlib-only.
"""
