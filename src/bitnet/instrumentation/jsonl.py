"""Append-only JSONL: one object a line, each write a whole line followed by a flush.

Readers (the status tool) skip a torn last line, so a crash mid-write loses one row at most.
"""

import json
import math
from pathlib import Path

from bitnet.instrumentation.base import Hook


def _clean(v):
    """JSON has no NaN/Inf: write them as strings so every line stays parseable by strict readers."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class JsonlWriter:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(_clean(row), allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: Path) -> list[dict]:
    """All complete rows; a torn or garbled line is skipped."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return rows


class ScalarsLogger(Hook):
    """Writes each log step's row to metrics/scalars.jsonl."""

    def __init__(self, run_dir: Path):
        self.writer = JsonlWriter(Path(run_dir) / "metrics" / "scalars.jsonl")

    def on_log(self, state, row):
        self.writer.write(row)

    def close(self):
        self.writer.close()
