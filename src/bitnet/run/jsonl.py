"""Append-only JSONL, the one reader and the one writer (docs/design.md, "run directory").

Each write is a whole line followed by a flush; readers skip a line that does not parse (the last one
may be torn while a trainer appends, a crash can leave one in the middle), so a crash loses one row at
most. Standard library only: the status tool reads through it.
"""

import json
import math
import os
from pathlib import Path


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
    """Appends rows to `path` (its directory made if missing)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(_clean(row), allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def parse_lines(lines) -> list[dict]:
    """The JSON objects among `lines`; a line that does not parse, or holds no object, is skipped."""
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_jsonl(path) -> list[dict]:
    """All complete rows of a JSONL file, [] if it is missing or unreadable."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            return parse_lines(f)
    except OSError:
        return []


class JsonlReader:
    """read_jsonl for files read again and again (bitnet-status --watch): each file's lines up to its
    last newline are parsed once and kept, so a refresh parses only what was appended since. The text
    after the last newline (a row being written) is parsed afresh on every read, as read_jsonl does.
    A file that shrank or was replaced by another file is read again from its start."""

    def __init__(self):
        self._files: dict[str, tuple[tuple[int, int], int, list[dict]]] = {}  # path: ((dev, ino), offset, rows)

    def read(self, path) -> list[dict]:
        key = str(path)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                ident, offset, rows = self._files.get(key, (None, 0, []))
                if ident != (st.st_dev, st.st_ino) or st.st_size < offset:
                    offset, rows = 0, []
                f.seek(offset)
                data = f.read()
        except OSError:
            self._files.pop(key, None)
            return []
        complete = data.rfind(b"\n") + 1
        if complete:
            rows = rows + parse_lines(data[:complete].decode("utf-8", errors="replace").split("\n"))
        self._files[key] = ((st.st_dev, st.st_ino), offset + complete, rows)
        return rows + parse_lines([data[complete:].decode("utf-8", errors="replace")])
