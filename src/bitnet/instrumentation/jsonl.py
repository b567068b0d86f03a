"""ScalarsLogger: the metrics row to metrics/scalars.jsonl. The JSONL format is bitnet.run.jsonl's."""

from pathlib import Path

from bitnet.instrumentation.base import Hook
from bitnet.run import layout
from bitnet.run.jsonl import JsonlWriter, read_jsonl  # noqa: F401  (the hooks' writer)


class ScalarsLogger(Hook):
    """Writes each log step's row to metrics/scalars.jsonl."""

    def __init__(self, run_dir: Path):
        self.writer = JsonlWriter(Path(run_dir) / layout.SCALARS)

    def on_log(self, state, row):
        self.writer.write(row)

    def close(self):
        self.writer.close()
