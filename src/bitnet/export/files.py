"""Writing an export directory atomically, and the export's one-line error type.

An export is written into a hidden sibling `.<name>.tmp-<pid>/` and renamed into place at the
end, like checkpoints (bitnet/run/checkpoint.py): a crash never leaves a half export under the name.
"""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import safetensors.torch


class ExportError(Exception):
    """An input the exporter cannot use; the message is one line for the user."""


def check_writable(out_dir: str | Path, overwrite: bool) -> Path:
    """Fail early (before loading anything heavy) if `out_dir` cannot be written or would be clobbered."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output directory {out} is not empty (pass --overwrite to replace it)")
    check_parent_writable(out, "output directory")
    return out


def check_parent_writable(out: Path, what: str) -> None:
    """Make `out`'s parent directory if needed and prove a file can be created there, or ExportError."""
    parent = out.absolute().parent
    blocker = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ExportError(f"cannot write the {what} {out}: {blocker} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{out.name}.probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ExportError(f"cannot write the {what} {out}: {e.strerror or type(e).__name__}") from None


def write_dir(out_dir: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call fill(tmp_dir) to write every file, then move tmp_dir to out_dir; returns out_dir."""
    out = check_writable(out_dir, overwrite)
    tmp = out.absolute().parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_safetensors(path: Path, tensors: dict, metadata: dict) -> None:
    """safetensors file written through Python's open (so it gets the umask's permissions)."""
    path.write_bytes(safetensors.torch.save(tensors, metadata=metadata))


def dir_size_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
