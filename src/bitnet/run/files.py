"""Atomic and durable file helpers: directory fsync, checksums, write-then-rename JSON (docs/design.md,
"run directory"). Standard library only."""

import hashlib
import json
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a crash cannot undo it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj: dict) -> None:
    """Write atomically (temp file + rename) so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def os_error_message(e: OSError) -> str:
    """One line for a failed file operation, e.g. 'No space left on device: runs/x/scalars.jsonl'."""
    return f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
