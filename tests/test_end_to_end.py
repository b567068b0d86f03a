"""End to end: the quick-start command and the seed's 10-step script, run as a user would."""

import json
import os
import subprocess
import sys
from pathlib import Path

from bitnet.cli.train import train_main
from tests.conftest import read_rows

ROOT = Path(__file__).resolve().parents[1]
SCALAR_KEYS = {"step", "tokens", "loss", "lr", "wd", "grad_norm", "step_ms", "tok_s", "mem_gib", "time"}


def test_quickstart_preset_defaults_write_the_whole_run_dir(runs):
    # The quick start is `bitnet-train --preset tiny --data embedded`; a shortened copy of it here.
    assert train_main(["--preset", "tiny", "--runs-dir", str(runs), "--run-id", "qs", "--num-steps", "20",
                       "--eval-interval", "10", "--checkpoint-interval", "10", "--quiet"]) == 0
    run = runs / "qs"
    cfg = json.loads((run / "meta" / "config.json").read_text())
    assert cfg["train"]["data"] == "embedded" and cfg["model"]["dim"] == 64
    prov = json.loads((run / "meta" / "provenance.json").read_text())
    assert {"git_commit", "git_dirty", "command", "host", "python", "torch", "cuda", "gpu", "seed",
            "start_time", "resumed_from"} <= set(prov)
    fp = json.loads((run / "meta" / "dataset_fingerprint.json").read_text())
    assert len(fp["first_1000_train_tokens_sha256"]) == 64 and fp["tokenizer"] == "llama2"
    rows = read_rows(run / "metrics" / "scalars.jsonl")
    assert [r["step"] for r in rows] == [10, 20] and all(SCALAR_KEYS <= set(r) for r in rows)
    assert rows[-1]["tokens"] == 20 * 8 * 128
    assert rows[-1]["loss"] < rows[0]["loss"] < 10.6  # it learns
    evals = read_rows(run / "eval" / "eval_results.jsonl")
    assert [e["step"] for e in evals] == [10, 20]
    assert (run / "checkpoints" / "step_000010" / "checkpoint.pt").is_file()
    for sub in ("samples", "anomalies"):
        assert (run / sub).is_dir()


def test_first_logged_step_uses_the_first_warmup_lr_and_loss_near_ln_vocab(runs):
    # (a warmup must end before the stage boundary: 4 steps with the boundary at 3 allow 2)
    assert train_main(["--preset", "tiny", "--runs-dir", str(runs), "--run-id", "w", "--num-steps", "4",
                       "--stage-boundary", "0.75", "--log-interval", "1", "--warmup-steps", "2", "--no-eval",
                       "--quiet"]) == 0
    rows = read_rows(runs / "w" / "metrics" / "scalars.jsonl")
    assert rows[0]["step"] == 1 and rows[0]["lr"] == 1.5e-3 / 2
    assert abs(rows[0]["loss"] - 10.3735) < 0.5
    assert not list((runs / "w" / "eval").iterdir())  # --no-eval


def test_seed_10_step_script(tmp_path):
    env = {**os.environ, "RUNS_DIR": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "test_training_10steps.sh")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: 10 steps" in proc.stdout
    steps = sorted(p.name for p in (tmp_path / "test_10steps" / "checkpoints").iterdir())
    assert steps[-2:] == ["step_000005", "step_000010"]
