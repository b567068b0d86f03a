"""Shared helpers for the instrumentation tests: tiny CPU training runs in a temp directory.

Torch runs single-threaded here: the results do not depend on it, and on a small shared CPU box
one thread is several times faster than two contending ones.
"""

import sys
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:  # also runs from a fresh clone before `pip install -e .`
    sys.path.insert(0, str(SRC))

from bitnet.cli import resolve_config  # noqa: E402
from bitnet.train.loop import train  # noqa: E402

# Small but real: the tiny preset on the embedded corpus, 32-token sequences, 4 sequences a step.
BASE_ARGS = {"preset": "tiny", "seq_len": 32, "batch_size": 4, "warmup_steps": 2, "eval_sequences": 8,
             "log_interval": 1, "checkpoint_interval": 1000, "sample_max_tokens": 12}


def _argv(**overrides) -> list[str]:
    argv = []
    if "num_steps" in overrides and "warmup_steps" not in overrides:  # warmup ends before the stage boundary
        overrides["warmup_steps"] = min(2, max(round(overrides["num_steps"] * 0.5), 1) - 1)
    for key, value in {**BASE_ARGS, **overrides}.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, str(value)]
    return argv


def run_training(runs_dir: Path, run_id: str, **overrides):
    """Train through the real CLI config path and loop; returns the loop's RunResult."""
    cfg, model_cfg, resume, _ = resolve_config(_argv(runs_dir=runs_dir, run_id=run_id, **overrides))
    return train(cfg, model_cfg, resume=resume, quiet=True)


@pytest.fixture
def train_run():
    return run_training


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("# two short prompts\nThe President said\n\nScience is\n")
    return path
