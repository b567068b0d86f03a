"""The only module that touches checkpoint files.

Layout: <run>/checkpoints/step_000500/{checkpoint.pt, meta.json}. A save writes into
`step_000500.tmp/`, fsyncs, writes meta.json (with the sha256 of checkpoint.pt) last, then
renames the directory: a crash never leaves a half checkpoint under a step name, and a
directory without a valid meta.json is not a checkpoint. Loading uses `weights_only=True`:
a checkpoint is data, never code.
"""

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import torch

import bitnet
from bitnet.fileio import fsync_dir, sha256_file

STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line for the user."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save(run_dir: Path, step: int, state: dict, milestone: bool = False) -> Path:
    """Write `state` atomically as checkpoints/step_XXXXXX; returns the final directory."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / (step_dir_name(step) + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with open(tmp / "checkpoint.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        meta = {"step": step, "tokens": state.get("tokens"), "milestone": milestone,
                "sha256": sha256_file(tmp / "checkpoint.pt"), "bitnet_version": bitnet.__version__,
                "torch_version": torch.__version__}
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        # Test hook (tests/faults): hold a complete checkpoint under its temp name for this many
        # seconds, so a test can SIGKILL the trainer between the last write and the rename.
        time.sleep(float(os.environ.get("BITNET_TEST_SLOW_CHECKPOINT_S", "0") or 0))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def resolve(path: str | Path) -> Path:
    """checkpoint.pt of a path that names the file, its step directory, or a run directory (latest)."""
    p = Path(path)
    if p.is_dir() and (p / "checkpoints").is_dir():
        found = latest(p)
        if found is None:
            raise CheckpointError(f"no complete checkpoint in run directory {p}")
        return found / "checkpoint.pt"
    if p.is_dir():
        p = p / "checkpoint.pt"
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return p


def verify(step_dir: Path) -> dict:
    """meta.json of a complete checkpoint whose checkpoint.pt matches its recorded sha256."""
    meta_path = step_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{step_dir} is incomplete (meta.json unreadable: {type(e).__name__})") from None
    pt = step_dir / "checkpoint.pt"
    if not pt.is_file() or sha256_file(pt) != meta.get("sha256"):
        raise CheckpointError(f"{pt} is corrupt or truncated (sha256 differs from meta.json)")
    return meta


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint (file, step dir or run dir) safely; raises CheckpointError with a one-line reason."""
    pt = resolve(path)
    if (pt.parent / "meta.json").exists():
        verify(pt.parent)
    try:
        state = torch.load(pt, map_location=map_location, weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"cannot load checkpoint {pt} (corrupt, or not a safe bitnet checkpoint): {first}") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{pt} is not a bitnet training checkpoint (no model/step entries)")
    return state


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of step directories that carry a meta.json, oldest first (not verified)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / "meta.json").is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest(run_dir: Path) -> Path | None:
    """Newest checkpoint whose contents match its checksum; corrupt ones are skipped with a warning."""
    for step, d in reversed(list_checkpoints(run_dir)):
        try:
            verify(d)
            return d
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint: {e}")
    return None


def prune(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete non-milestone checkpoints beyond the newest `keep_last`; returns what was removed."""
    removed = []
    ordinary = []
    for step, d in list_checkpoints(run_dir):
        try:
            milestone = json.loads((d / "meta.json").read_text()).get("milestone", False)
        except (OSError, ValueError):
            milestone = False
        if not milestone:
            ordinary.append(d)
    for d in ordinary[:max(len(ordinary) - keep_last, 0)]:
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed
