"""Append-only JSONL, the one reader and the one writer (docs/design.md, "run directory").

Each write is a whole line followed by a flush; readers skip a line that does not parse (the last one
may be torn while a trainer appends, a crash can leave one in the middle), so a crash loses one row at
most. Standard library only: the status tool reads through it.
"""

import json
import math
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
    """All complete rows of a JSONL file, [] if it is missing or unreadable. Lines end at "\n" (a "\r"
    before it is JSON whitespace); text after the last one is parsed too, and skipped if it does not parse."""
    return JsonlReader().read(path)


class JsonlReader:
    """read_jsonl for files read again and again (bitnet-status --watch): each file's lines up to its
    last newline are parsed once and kept, so a refresh parses only what was appended since; the text
    after the last newline (a row being written) is parsed afresh on every read.

    The kept rows are reused only while the file still holds the same bytes at its start and just before
    where the kept rows end (ANCHOR_BYTES each): a file cut, rewritten or replaced by another (whose
    inode number may be the old one's, reused) is read again from its start."""

    ANCHOR_BYTES = 256

    def __init__(self):
        self._files: dict[str, tuple[int, bytes, bytes, list[dict]]] = {}  # path: (offset, head, tail, rows)

    def read(self, path) -> list[dict]:
        key = str(path)
        try:
            with open(path, "rb") as f:
                offset, head, tail, rows = self._files.get(key, (0, b"", b"", []))
                same = _bytes_at(f, 0, len(head)) == head and _bytes_at(f, offset - len(tail), len(tail)) == tail
                if not same:
                    offset, rows = 0, []
                data = _bytes_at(f, offset, -1)
                complete = data.rfind(b"\n") + 1
                if complete:
                    rows = rows + _parse(data[:complete])
                    offset += complete
                    n = min(offset, self.ANCHOR_BYTES)
                    self._files[key] = (offset, _bytes_at(f, 0, n), _bytes_at(f, offset - n, n), rows)
        except OSError:
            self._files.pop(key, None)
            return []
        return rows + _parse(data[complete:])


def _bytes_at(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _parse(data: bytes) -> list[dict]:
    return parse_lines(data.decode("utf-8", errors="replace").split("\n"))
