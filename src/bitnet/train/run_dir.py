"""The run directory (DESIGN.md section 3): naming, creation and the meta/ files."""

import json
import os
import re
import shutil
import time
from pathlib import Path

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def default_run_id(preset: str, data: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9]+", "-", data).strip("-")[:32] or "data"
    return f"{preset}_{safe}_{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_id(run_id: str) -> None:
    if not RUN_ID.match(run_id):
        raise ValueError(f"invalid --run-id {run_id!r}: use letters, digits, '.', '_' and '-' (no path separators)")


def check_run_dir(runs_dir: str, run_id: str, overwrite: bool) -> Path:
    """runs_dir/run_id, if a run may be created there; the CLI calls it before the (slow) data setup."""
    check_run_id(run_id)
    run_dir = Path(runs_dir) / run_id
    if run_dir.exists():
        if not overwrite:
            raise FileExistsError(f"run directory {run_dir} already exists (pass --overwrite to replace it, "
                                  f"or --resume-from {run_dir} to continue it in a new run)")
        if not (run_dir / "meta").is_dir():
            raise FileExistsError(f"{run_dir} exists and is not a run directory; refusing to delete it")
    elif Path(runs_dir).exists() and not Path(runs_dir).is_dir():
        raise FileExistsError(f"--runs-dir {runs_dir} is not a directory")
    return run_dir


def create_run_dir(runs_dir: str, run_id: str, overwrite: bool, resumed_from: str | None = None) -> Path:
    """Make runs_dir/run_id with its subdirectories; refuses to reuse one unless overwrite is set.

    The directory itself is made with one mkdir that fails if it exists: of two processes that chose
    the same name (two auto-resumes of one run), the loser says so instead of sharing it.
    """
    def raced() -> FileExistsError:
        return FileExistsError(f"another resume of run {base_run_id(run_id)!r} is in progress: it created "
                               f"{Path(runs_dir) / run_id} "
                               f"while this one was setting up; let it run (or stop it first)")

    if resumed_from and not overwrite and (Path(runs_dir) / run_id).exists():
        raise raced()
    run_dir = check_run_dir(runs_dir, run_id, overwrite)
    if run_dir.exists():  # --overwrite of a run directory
        shutil.rmtree(run_dir)
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
    except FileExistsError:
        if resumed_from:
            raise raced() from None
        raise FileExistsError(f"run directory {run_dir} was created by another process while this one was "
                              f"setting up; pick another --run-id") from None
    for sub in ("meta", "checkpoints", "metrics", "eval", "samples", "anomalies"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    return run_dir


LOCK = "meta/lock"


def lock_run_dir(run_dir: Path):
    """Hold an exclusive lock on <run>/meta/lock (with this pid in it) until the returned file is closed
    or the process ends, however it ends; None where file locks are unavailable."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, no live-run check
        return None
    f = open(Path(run_dir) / LOCK, "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.truncate(0)
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def live_run(run_dir: Path) -> str | None:
    """'pid N' if a trainer holds run_dir's lock now (the run is in progress), else None."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        f = open(Path(run_dir) / LOCK)
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "a running process"
        except OSError:
            return None
    return None


def write_json(path: Path, obj: dict) -> None:
    """Write atomically (temp file + rename) so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- continuations: a resumed run starts a new directory named after the run and the step it resumed from
CONTINUATION = re.compile(r"^(?P<base>.+)_r\d+(?:-\d+)?$")


def base_run_id(run_id: str) -> str:
    """The run a continuation belongs to: X for X, X_r500 and X_r500-2."""
    m = CONTINUATION.match(run_id)
    return m.group("base") if m else run_id


def run_family(runs_dir: str, run_id: str) -> list[Path]:
    """Run directories of run_id's family: the base run X and its continuations X_r<step>[-n]."""
    base, root = base_run_id(run_id), Path(runs_dir)
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and base_run_id(d.name) == base)


def continuation_id(runs_dir: str, run_id: str, step: int) -> str:
    """Id of the run that continues run_id's family from `step`: X_r<step>, or X_r<step>-2, -3 ... if taken."""
    base = base_run_id(run_id)
    new, n = f"{base}_r{step}", 2
    while (Path(runs_dir) / new).exists():
        new, n = f"{base}_r{step}-{n}", n + 1
    check_run_id(new)
    return new
