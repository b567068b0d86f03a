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
            _torch_save(state, f, tmp / "checkpoint.pt")
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
    if p.name == "checkpoints" and p.is_dir() and not (p / "checkpoints").is_dir():
        return p.parent
    if p.is_dir() and (p / "checkpoints").is_dir():
        return p
    return None


def resolve(path: str | Path) -> Path:
    """checkpoint.pt of a path that names the file, its step directory, or a run directory (latest)."""
    run = run_dir_of(path)
    if run is not None:
        found = latest(run)
        if found is None:
            raise CheckpointError(f"no complete checkpoint in run directory {run}")
        return found / "checkpoint.pt"
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint.pt"
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return p


def verify(step_dir: Path) -> dict:
    """meta.json of a complete checkpoint whose checkpoint.pt matches its recorded sha256."""
    meta_path = step_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{step_dir} is incomplete (meta.json unreadable: {type(e).__name__})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
        raise CheckpointError(f"{meta_path} is not a checkpoint manifest (a JSON object with a sha256)")
    pt = step_dir / "checkpoint.pt"
    if not pt.is_file() or sha256_file(pt) != meta["sha256"]:
        raise CheckpointError(f"{pt} is corrupt or truncated (sha256 differs from meta.json)")
    return meta


def load(path: str | Path, map_location="cpu", need: str | None = None) -> dict:
    """Load a checkpoint (file, step dir or run dir) safely and check it holds what `need` asks for.

    need: None (a dict with model and step entries), "model" (weights that fit the config: generate,
    export) or "resume" (also optimizer, train state, RNG: training). A run directory gives its newest checkpoint that loads (see load_newest).
    Raises CheckpointError with a one-line reason.
    """
    return load_with_path(path, map_location, need)[1]


def load_with_path(path: str | Path, map_location="cpu", need: str | None = None) -> tuple[Path, dict]:
    """(checkpoint.pt loaded, its contents): `load`, also saying which file a run directory gave."""
    run = run_dir_of(path)
    if run is None:
        pt = resolve(path)
        return pt, _load_file(pt, map_location, need)
    found = [d for _, d in reversed(list_checkpoints(run))]
    if not found:
        raise CheckpointError(f"no complete checkpoint in run directory {run}")
    step_dir, state = load_newest(found, map_location, need, f"run directory {run}")
    return step_dir / "checkpoint.pt", state


def load_newest(step_dirs: list[Path], map_location="cpu", need: str = "resume", where: str = "") -> tuple[Path, dict]:
    """The first of `step_dirs` (newest first) that loads; each one before it that does not is skipped
    with a `skipping checkpoint: <why>` warning. If none loads: CheckpointError with the newest one's
    reason, naming the others that failed too."""
    failed = []
    for step_dir in step_dirs:
        try:
            state = _load_file(step_dir / "checkpoint.pt", map_location, need)
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


def _load_file(pt: Path, map_location, need: str) -> dict:
    verified = (pt.parent / "meta.json").exists()
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
    problem = check_contents(state, need)
    if problem:
        raise CheckpointError(f"{pt} cannot be used: {problem}")
    if not verified:  # it loads, but nothing says it is the file the trainer wrote
        warnings.warn(f"{pt} has no meta.json next to it: loaded unverified (no checksum to check it against)")
    return state


RESUME_ENTRIES = {"model": dict, "optimizer": dict, "train_state": dict, "rng": dict, "config": dict, "step": int,
                  "tokens": int}


def check_contents(state, need: str = "model") -> str | None:
    """What makes a loaded checkpoint unusable for `need`, in a few words; None if nothing does.

    Checks the entries' types, and the weights' (and for a resume the optimizer state's) names and
    shapes against the model its own config describes, built on the meta device (no memory).
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
    from bitnet.model import ModelConfig, Transformer

    try:
        with torch.device("meta"):
            model = Transformer(ModelConfig.from_dict(config["model"]))
    except (TypeError, ValueError) as e:
        return f"its model config is unusable: {str(e).splitlines()[0][:200]}"
    weights = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state["model"].items()}
    problem = _compare_shapes("weight", weights, {k: v.shape for k, v in model.state_dict().items()})
    if problem or need != "resume":
        return problem
    return _check_optimizer(state["optimizer"], model) or _check_train_state(state["train_state"], state["rng"])


def _compare_shapes(what: str, got: dict, want: dict) -> str | None:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        return f"{what} {missing[0]!r} missing ({len(missing)} missing in all) for its model config"
    if extra:
        return f"unexpected {what} {extra[0]!r} ({len(extra)} unexpected in all) for its model config"
    for name, shape in want.items():
        value = got[name]
        if not isinstance(value, torch.Tensor):
            return f"{what} {name!r} is a {type(value).__name__}, not a tensor"
        if value.shape != shape:
            return f"{what} {name!r} has shape {tuple(value.shape)}, its model config needs {tuple(shape)}"
    return None


def _check_optimizer(optim: dict, model) -> str | None:
    """AdamW state of the parameters in build_optimizer's order: group sizes and moment shapes."""
    from bitnet.train.config import TrainConfig
    from bitnet.train.optim import build_optimizer

    expected = build_optimizer(model, TrainConfig(), fused=False)
    groups, moments = optim.get("param_groups"), optim.get("state")
    if not isinstance(groups, list) or not isinstance(moments, dict) or not all(isinstance(g, dict) for g in groups):
        return "its optimizer state has no param_groups list or state table"
    sizes = [len(g.get("params", ())) for g in groups]
    want_sizes = [len(g["params"]) for g in expected.param_groups]
    if sizes != want_sizes:
        return f"its optimizer state has parameter groups of {sizes}, the model needs {want_sizes}"
    shapes = [p.shape for g in expected.param_groups for p in g["params"]]
    for index, s in moments.items():
        if not isinstance(index, int) or not 0 <= index < len(shapes) or not isinstance(s, dict):
            return f"its optimizer state has an entry for parameter {index!r}, which the model does not have"
        for key in ("exp_avg", "exp_avg_sq"):
            t = s.get(key)
            if t is not None and (not isinstance(t, torch.Tensor) or t.shape != shapes[index]):
                return f"its optimizer {key} of parameter {index} does not match the parameter's shape"
    return None


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
