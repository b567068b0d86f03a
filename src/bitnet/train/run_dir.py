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


def create_run_dir(runs_dir: str, run_id: str, overwrite: bool) -> Path:
    """Make runs_dir/run_id with its subdirectories; refuses to reuse one unless overwrite is set."""
    check_run_id(run_id)
    run_dir = Path(runs_dir) / run_id
    if run_dir.exists():
        if not overwrite:
            raise FileExistsError(f"run directory {run_dir} already exists (pass --overwrite to replace it, "
                                  f"or --resume-from {run_dir} to continue it in a new run)")
        if not (run_dir / "meta").is_dir():
            raise FileExistsError(f"{run_dir} exists and is not a run directory; refusing to delete it")
        shutil.rmtree(run_dir)
    for sub in ("meta", "checkpoints", "metrics", "eval", "samples", "anomalies"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    return run_dir


def write_json(path: Path, obj: dict) -> None:
    """Write atomically (temp file + rename) so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
