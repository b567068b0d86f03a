"""Small file helpers shared by checkpoints and token shards: directory fsync and file checksums."""

import hashlib
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


def os_error_message(e: OSError) -> str:
    """One line for a failed file operation, e.g. 'No space left on device: runs/x/scalars.jsonl'."""
    return f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
