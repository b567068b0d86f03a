"""Helpers of the fault suite: trainer flags, a trainer subprocess to kill, run-dir readers.

Every run here shares the loss-relevant flags of `BASE` (tiny preset, 24 steps of 2 x 16 tokens),
so one uninterrupted in-process run (the `reference` fixture) is the ground truth that every killed
and resumed run is compared with, bit for bit. Subprocesses and in-process runs both use one CPU
thread, so they do the same float operations in the same order.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from bitnet.cli.train import train_main

ROOT = Path(__file__).resolve().parents[2]
SLOW_CHECKPOINT_S = 2.0
"""BITNET_TEST_SLOW_CHECKPOINT_S for runs killed around a checkpoint: the window the test has to hit."""

BASE = dict(preset="tiny", data="embedded", num_steps=24, batch_size=2, seq_len=16, warmup_steps=2,
            log_interval=1, no_eval=True, quant_interval=0, sample_interval=0, checkpoint_interval=4)
"""Loss-relevant flags shared by every run compared with the reference (stage boundary at step 12)."""


def flags(runs_dir, run_id: str | None, **overrides) -> list[str]:
    """bitnet-train flags: BASE updated by overrides (True: a bare flag; None/False: left out)."""
    values = {**BASE, "runs_dir": str(runs_dir), "run_id": run_id, **overrides}
    out = []
    for key, v in values.items():
        flag = "--" + key.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is not None and v is not False:
            out += [flag, str(v)]
    return out + ["--quiet"]


@contextlib.contextmanager
def one_thread():
    """In-process runs use one thread, like the subprocesses (OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(argv: list[str]) -> int:
    with one_thread():
        return train_main(argv)


def child_env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Trainer:
    """`python -m bitnet.cli ...` as a real subprocess, with its stdout/stderr in files."""

    def __init__(self, argv: list[str], log_dir: Path, **env):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "bitnet.cli", *argv], stdout=out, stderr=err,
                                         cwd=log_dir, env=child_env(**env))

    def wait_for(self, condition, timeout_s: float = 300.0, poll_s: float = 0.01) -> bool:
        """Poll until condition() holds (True) or the process ended first (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.proc.poll() is not None:
                return condition()
            time.sleep(poll_s)
        self.proc.kill()
        raise TimeoutError(f"condition not reached in {timeout_s}s; stderr: {self.err_path.read_text()[-2000:]}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> int:
        """SIGKILL: no handler, no cleanup, exactly like the OOM killer or a preempted node."""
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(60)

    def wait(self, timeout_s: float = 300.0) -> int:
        return self.proc.wait(timeout_s)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()


def rows(run_dir: Path) -> list[dict]:
    """scalars.jsonl rows; a torn last line (a kill mid-write) is skipped, as the status tool does."""
    out = []
    path = Path(run_dir) / "metrics" / "scalars.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def logged_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in rows(run_dir)]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run_dir)}


def last_logged_step(run_dir: Path) -> int:
    """Step of the last complete scalars row, from the file's tail (cheap enough to poll)."""
    path = Path(run_dir) / "metrics" / "scalars.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 4096, 0))
            tail = f.read().decode(errors="replace").split("\n")
    except FileNotFoundError:
        return 0
    for line in reversed(tail[:-1]):  # the text after the last newline may be a row still being written
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return int(json.loads(line)["step"])
    return 0


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete (renamed, meta.json present) checkpoint directories."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(d.name[5:]) for d in root.iterdir() if d.name[5:].isdigit() and (d / "meta.json").is_file())


def tree(path: Path) -> dict:
    """Every file and directory under path with its size and mtime: equal trees mean nothing was written."""
    path = Path(path)
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def assert_matches_reference(resumed_run: Path, reference_run: Path, first_step: int) -> list[int]:
    """The resumed run logged exactly steps first_step..N, each loss equal (==) to the reference's."""
    got, want = losses(resumed_run), losses(reference_run)
    assert sorted(got) == list(range(first_step, BASE["num_steps"] + 1)), sorted(got)
    mismatched = [s for s in got if got[s] != want[s]]
    assert not mismatched, {s: (got[s], want[s]) for s in mismatched}
    return sorted(got)
