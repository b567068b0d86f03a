"""The only module that touches checkpoint files.

Layout: <run>/checkpoints/step_000500/{checkpoint.pt, meta.json}. A save writes into
`step_000500.tmp/`, fsyncs, writes meta.json (with the sha256 of checkpoint.pt) last, then
renames the directory: a crash never leaves a half checkpoint under a step name, and a
directory without a valid meta.json is not a checkpoint. Loading uses `weights_only=True`:
a checkpoint is data, never code.

A checkpoint that passes its checksum can still be unusable (entries missing, weights that do not
fit its config): `load` checks what the caller needs (`need="model"` for generate/export, "resume"
for training) and raises CheckpointError with one line; for a run directory it falls back to the
newest checkpoint that loads, warning about each one it skipped.
"""

import errno
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

import bitnet
from bitnet.run.files import fsync_dir, sha256_file
from bitnet.run.layout import (CHECKPOINT_FILE, CHECKPOINT_META, CHECKPOINTS, DELETING_SUFFIX, STEP_DIR, TMP_SUFFIX,
                               step_dir_name)


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line for the user."""


def save(run_dir: Path, step: int, state: dict, milestone: bool = False) -> Path:
    """Write `state` atomically as checkpoints/step_XXXXXX; returns the final directory."""
    ckpt_root = Path(run_dir) / CHECKPOINTS
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / (step_dir_name(step) + TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with open(tmp / CHECKPOINT_FILE, "wb") as f:
            _torch_save(state, f, tmp / CHECKPOINT_FILE)
            f.flush()
            os.fsync(f.fileno())
        meta = {"step": step, "tokens": state.get("tokens"), "milestone": milestone,
                "sha256": sha256_file(tmp / CHECKPOINT_FILE), "bytes": (tmp / CHECKPOINT_FILE).stat().st_size,
                "bitnet_version": bitnet.__version__,
                "torch_version": torch.__version__}
        with open(tmp / CHECKPOINT_META, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        # Test hook (tests/faults): hold a complete checkpoint under its temp name for this many
        # seconds, so a test can SIGKILL the trainer between the last write and the rename.
        time.sleep(float(os.environ.get("BITNET_TEST_SLOW_CHECKPOINT_S", "0") or 0))
        if final.exists():
            remove_step_dir(final)
        os.rename(tmp, final)
        fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _torch_save(state: dict, f, path: Path) -> None:
    """torch.save, with its RuntimeError for a failed write (a full disk) turned into the OSError it is."""
    try:
        torch.save(state, f)
    except RuntimeError as e:  # e.g. "[enforce fail at inline_container.cc] unexpected pos", the OSError its context
        cause = e.__context__ if isinstance(e.__context__, OSError) else None
        if cause is None and "write" not in str(e).lower() and "inline_container" not in str(e):
            raise
        code = (cause.errno if cause is not None and cause.errno else
                errno.ENOSPC if _nearly_full(path.parent) else errno.EIO)
        raise OSError(code, os.strerror(code), str(path)) from None


def _nearly_full(directory: Path) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 16 << 20  # under 16 MiB left: the write ran out of space


def run_dir_of(path: str | Path) -> Path | None:
    """The run directory `path` names (runs/<id> or runs/<id>/checkpoints), else None."""
    p = Path(path)
    if p.name == CHECKPOINTS and p.is_dir() and not (p / CHECKPOINTS).is_dir():
        return p.parent
    if p.is_dir() and (p / CHECKPOINTS).is_dir():
        return p
    return None


def resolve(path: str | Path) -> Path:
    """checkpoint.pt of a path that names the file, its step directory, or a run directory (latest)."""
    run = run_dir_of(path)
    if run is not None:
        found = latest(run)
        if found is None:
            raise CheckpointError(f"no complete checkpoint in run directory {run}")
        return found / CHECKPOINT_FILE
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_FILE
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return p


def verify(step_dir: Path) -> dict:
    """meta.json of a complete checkpoint whose checkpoint.pt matches its recorded sha256."""
    meta_path = step_dir / CHECKPOINT_META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{step_dir} is incomplete (meta.json unreadable: {type(e).__name__})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
        raise CheckpointError(f"{meta_path} is not a checkpoint manifest (a JSON object with a sha256)")
    pt = step_dir / CHECKPOINT_FILE
    if not pt.is_file() or sha256_file(pt) != meta["sha256"]:
        raise CheckpointError(f"{pt} is corrupt or truncated (sha256 differs from meta.json)")
    return meta


def load(path: str | Path, map_location="cpu", need: str | None = None, fits=None) -> dict:
    """Load a checkpoint (file, step dir or run dir) safely and check it holds what `need` asks for.

    need: None (a dict with model and step entries), "model" (weights that fit the config: generate,
    export) or "resume" (also optimizer, train state, RNG: training). A run directory gives its newest checkpoint that loads (see load_newest).
    Raises CheckpointError with a one-line reason.
    """
    return load_with_path(path, map_location, need, fits)[1]


def load_with_path(path: str | Path, map_location="cpu", need: str | None = None, fits=None) -> tuple[Path, dict]:
    """(checkpoint.pt loaded, its contents): `load`, also saying which file a run directory gave."""
    run = run_dir_of(path)
    if run is None:
        pt = resolve(path)
        return pt, _load_file(pt, map_location, need, fits)
    found = [d for _, d in reversed(list_checkpoints(run))]
    if not found:
        raise CheckpointError(f"no complete checkpoint in run directory {run}")
    step_dir, state = load_newest(found, map_location, need, f"run directory {run}", fits)
    return step_dir / CHECKPOINT_FILE, state


def load_newest(step_dirs: list[Path], map_location="cpu", need: str = "resume", where: str = "",
                fits=None) -> tuple[Path, dict]:
    """The first of `step_dirs` (newest first) that loads; each one before it that does not is skipped
    with a `skipping checkpoint: <why>` warning. If none loads: CheckpointError with the newest one's
    reason, naming the others that failed too."""
    failed = []
    for step_dir in step_dirs:
        try:
            state = _load_file(step_dir / CHECKPOINT_FILE, map_location, need, fits)
        except CheckpointError as e:
            failed.append((step_dir, e))
            continue
        for _, e in failed:
            warnings.warn(f"skipping checkpoint: {e}")
        return step_dir, state
    if not failed:
        raise CheckpointError(f"no complete checkpoint in {where or 'the given directories'}")
    others = f"; no older checkpoint in {where} loads either ({', '.join(d.name for d, _ in failed[1:])})"
    raise CheckpointError(f"{failed[0][1]}{others if len(failed) > 1 else ''}")


def _load_file(pt: Path, map_location, need: str, fits) -> dict:
    verified = (pt.parent / CHECKPOINT_META).exists()
    if verified:
        verify(pt.parent)
    if not pt.is_file():
        raise CheckpointError(f"checkpoint not found: {pt}")
    try:
        with warnings.catch_warnings():  # torch's own multi-line pickle warnings: our errors say it in one line
            warnings.simplefilter("ignore")
            state = torch.load(pt, map_location=map_location, weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"cannot load checkpoint {pt} (corrupt, or not a safe bitnet checkpoint): {first}") from None
    problem = check_contents(state, need, fits)
    if problem:
        raise CheckpointError(f"{pt} cannot be used: {problem}")
    if not verified:  # it loads, but nothing says it is the file the trainer wrote
        warnings.warn(f"{pt} has no meta.json next to it: loaded unverified (no checksum to check it against)")
    return state


RESUME_ENTRIES = {"model": dict, "optimizer": dict, "train_state": dict, "rng": dict, "config": dict, "step": int,
                  "tokens": int}


def check_contents(state, need: str | None = "model", fits=None) -> str | None:
    """What makes a loaded checkpoint unusable for `need`, in a few words; None if nothing does.

    Checks the entries, their types and (for a resume) the train state and RNG entries here; `fits`
    (bitnet.model.checkpoint_fit.check_fits) adds the weights' and the optimizer state's names and
    shapes against the model its own config describes: that needs the model, which this package
    does not import.
    """
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a bitnet training checkpoint"
    kinds = {"resume": tuple(RESUME_ENTRIES), "model": ("model", "config", "step"), None: ("model", "step")}
    wanted = {k: RESUME_ENTRIES[k] for k in kinds[need]}
    missing = [k for k in wanted if k not in state]
    if missing:
        no_config = ": it has no model config" if "config" in missing else ""
        return (f"not a bitnet training checkpoint (no {', '.join(missing)} entr{'y' if len(missing) == 1 else 'ies'})"
                + no_config)
    for key, kind in wanted.items():
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            return f"its {key!r} entry is a {type(state[key]).__name__}, not a {kind.__name__}"
    if need is None:
        return None
    config = state["config"]
    if not isinstance(config.get("model"), dict) or (need == "resume" and not isinstance(config.get("train"), dict)):
        return "its config has no model" + (" or train" if need == "resume" else "") + " table"
    problem = fits(state, need) if fits is not None else None
    if problem or need != "resume":
        return problem
    return _check_train_state(state["train_state"], state["rng"])


def _check_train_state(train_state: dict, rng: dict) -> str | None:
    for key in ("step", "tokens"):
        if not isinstance(train_state.get(key), int) or isinstance(train_state.get(key), bool):
            return f"its train_state has no integer {key!r}"
    if not isinstance(train_state.get("data", {}), dict):
        return "its train_state 'data' entry is not a table"
    if not all(k in rng for k in ("python", "numpy", "torch_cpu")):
        return "its rng entry lacks the python, numpy or torch_cpu state"
    return None


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of step directories that carry a meta.json, oldest first (not verified)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / CHECKPOINT_META).is_file():
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
            milestone = json.loads((d / CHECKPOINT_META).read_text()).get("milestone", False)
        except (OSError, ValueError):
            milestone = False
        if not milestone:
            ordinary.append(d)
    for d in ordinary[:max(len(ordinary) - keep_last, 0)]:
        remove_step_dir(d)
        removed.append(d)
    for left in Path(run_dir, CHECKPOINTS).glob("*" + DELETING_SUFFIX):  # a kill mid-prune left it
        shutil.rmtree(left, ignore_errors=True)
    return removed


def remove_step_dir(d: Path) -> None:
    """Delete a checkpoint directory after renaming it to step_XXXXXX.deleting (a leftover of that name
    goes first), so no reader (a resume, bitnet-status) ever sees a half-deleted one under a step name.
    Where the rename fails, it is deleted where it is."""
    doomed = d.with_name(d.name + DELETING_SUFFIX)
    shutil.rmtree(doomed, ignore_errors=True)
    try:
        os.rename(d, doomed)
    except OSError:
        doomed = d
    shutil.rmtree(doomed, ignore_errors=True)
