"""`StartupClock`: where a run's time to its first step goes, one row per process in metrics/startup.jsonl.

The loop marks the end of each setup phase (`mark`); the first step's end is the hook's on_step_end, after
the loop has waited for the GPU. Phases, in order:
- imports: from the process's start where /proc tells it, for the first run in a process (the interpreter,
  torch and the package, arguments and config, a resume's checkpoint load, the process group); from
  `train`'s entry for a later run in the same process;
- data (tokenizer and loaders), model (built, moved, resumed), run_dir (the run directory and its meta
  files), step_fn (the step function: compile wrappers, CUDA graphs), hooks (hooks, checkpointer, metrics
  row, banner), hooks_start (the hooks' on_train_start: the first quant-stats forward), initial_checkpoint
  (a fresh run's step_000000);
- first_step: torch.compile and the kernels' compiles, and the step.
Why: the first step is where a run's fixed cost sits, compiles most of all, and a user waiting for the first
loss should see what they wait for; bitnet-status shows the row of the leg it is given.
"""

import time
from pathlib import Path

from bitnet.instrumentation.base import Hook
from bitnet.instrumentation.provenance import process_start_time
from bitnet.run import layout
from bitnet.run.jsonl import JsonlWriter
from bitnet.run.startup import startup_line


_process_start_taken = False
"""Whether a clock of this process already started at the process's start: a second run (tests, benchmarks
that train twice in one process) starts at its own `train` call instead."""


class StartupClock(Hook):
    def __init__(self, started_at: float | None = None):
        """started_at (Unix time); None: the process's start for the process's first clock (from /proc), else
        now."""
        global _process_start_taken
        if started_at is None and not _process_start_taken:
            started_at = process_start_time()
            _process_start_taken = True
        self.started_at = started_at or time.time()
        self.last = self.started_at
        self.phases: dict[str, float] = {}
        self.writer, self.log = None, None
        self.row: dict | None = None
        """The row once the first step ended (None before)."""

    def mark(self, phase: str) -> None:
        """The phase that ends now took the time since the last mark."""
        now = time.time()
        self.phases[phase] = now - self.last
        self.last = now

    def attach(self, run_dir: Path, log=None) -> "StartupClock":
        """Write the row into run_dir, and print it through `log` unless None (rank 0 only; other ranks never
        attach)."""
        self.writer, self.log = JsonlWriter(Path(run_dir) / layout.STARTUP), log
        return self

    def works_at(self, step: int) -> bool:
        # the loop waits for the GPU first: the first step's time is all in its mark (where the first step is also
        # a log step, the log row's sync and the hooks' on_log come before, and count in it too)
        return self.row is None

    def on_step_end(self, state, out) -> None:
        if self.row is not None:
            return
        self.mark("first_step")
        self.row = {"step": state.step, "started_at": self.started_at,
                    "time_to_first_step_s": self.last - self.started_at, "phases_s": dict(self.phases)}
        if self.writer is not None:
            self.writer.write(self.row)
        if self.log is not None:
            self.log(startup_line(self.row))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
