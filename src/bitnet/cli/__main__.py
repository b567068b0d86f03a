"""`python -m bitnet.cli`: bitnet-train as a plain process (the fault tests and scripts use it)."""

import sys

from bitnet.cli.train import train_main

sys.exit(train_main())
