"""Shared helpers: a fast tiny-run argument list and scalars reading."""

import json
from pathlib import Path

import pytest


def fast_args(runs_dir, run_id, steps=6, **extra) -> list[str]:
    """bitnet-train flags for a tiny CPU run that takes a second or two."""
    warmup = min(2, max(round(steps * 0.5), 1) - 1)  # warmup ends before the stage boundary (config.py)
    args = {"preset": "tiny", "data": "embedded", "runs-dir": str(runs_dir), "run-id": run_id,
            "num-steps": steps, "batch-size": 4, "seq-len": 32, "warmup-steps": warmup, "log-interval": 1,
            "eval-interval": 1000, "eval-sequences": 4, "sample-interval": 0, "checkpoint-interval": 1000}
    args.update({k.replace("_", "-"): v for k, v in extra.items()})
    out = []
    for k, v in args.items():
        if v is True:
            out.append(f"--{k}")
        elif v is not False and v is not None:
            out += [f"--{k}", str(v)]
    return out + ["--quiet"]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture
def runs(tmp_path):
    return tmp_path / "runs"
