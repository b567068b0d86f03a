"""`python -m bitnet.train`: the bitnet-train command line, also as torchrun's entry point.

    torchrun --standalone --nproc_per_node=8 -m bitnet.train --preset 95m
    python -m bitnet.train --preset tiny --run-id demo        # one process, no process group

Only rank 0 prints to stdout (banner, progress, the final summary); every rank keeps stderr for
its own errors, and torchrun's summary names the rank that failed first (`record`).
"""

import contextlib
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from bitnet.cli.train import train_main


@record
def main() -> int:
    if int(os.environ.get("RANK", "0")) == 0:
        return train_main()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        return train_main()


if __name__ == "__main__":
    sys.exit(main())
