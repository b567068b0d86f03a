"""benchmarks/model_sizes.py's plumbing on CPU: a child trainer run per row, its numbers read back, the growth fit."""

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bitnet.model import PRESETS, Transformer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "model_sizes.py"


def load_script():
    spec = importlib.util.spec_from_file_location("model_sizes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_row_runs_the_trainer_at_its_micro_batch_and_reports_its_numbers(tmp_path):
    out = tmp_path / "sizes.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--rows", "tiny:2,tiny:2+ac", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("tiny:2+ac")  # the table comes last
    data = json.loads(out.read_text())
    row, checkpointed = data["results"]["tiny:2"], data["results"]["tiny:2+ac"]
    assert "error" not in row and (row["checkpointed_blocks"], checkpointed["checkpointed_blocks"]) == (0, 2)
    assert checkpointed["losses"] == row["losses"]  # recomputing changes no number
    model = Transformer(PRESETS["tiny"])
    assert row["params"] == model.num_params() and row["flops_per_token"] == model.flops_per_token(32)
    assert (row["micro_batch"], row["grad_accum"], row["steps"]) == (2, 2, 4)  # 4 sequences as 2 micro-batches of 2
    assert len(row["losses"]) == 2 and all(math.isfinite(x) for x in row["losses"])  # rows at steps 2 and 4
    assert row["tok_s"] > 0 and 0 < row["ttfs_s"] < row["wall_s"]
    assert row["mfu"] == pytest.approx(row["flops_per_token"] * row["tok_s"] / 989.4e12)
    est_ms = 6 * row["matmul_params"] * 4 * 32 / 989.4e12 * 1000
    assert row["vs_6nt"] == pytest.approx(row["step_ms"] / est_ms)
    assert data["growth"] is None  # one size: nothing to fit


def test_rows_parse_and_bad_rows_are_refused():
    sizes = load_script()
    assert sizes.parse_rows("95m, 3b:16,1.3b:16+fp8,3b:32+ac,700m+ac3+fp8") == [
        ("95m", "95m", None, False, None), ("3b:16", "3b", 16, False, None), ("1.3b:16+fp8", "1.3b", 16, True, None),
        ("3b:32+ac", "3b", 32, False, "all"), ("700m+ac3+fp8", "700m", None, True, "3")]
    assert sizes.parse_rows("3b:4+ac0")[0].activation_checkpointing == "0"  # the 3b's default (all) turned off
    with pytest.raises(SystemExit, match=r"'\+bf16' in --rows '3b\+bf16' is neither \+fp8 nor \+ac\[N\]"):
        sizes.parse_rows("3b+bf16")
    with pytest.raises(SystemExit, match="is neither"):
        sizes.parse_rows("3b+acx")
    with pytest.raises(SystemExit, match="unknown preset '7b'"):
        sizes.parse_rows("95m,7b")
    with pytest.raises(SystemExit, match="micro-batch 'x' in --rows '3b:x'"):
        sizes.parse_rows("3b:x")


def test_growth_exponent_is_the_log_log_slope():
    sizes = load_script()
    # step time that grows like N^1.5 over three sizes; a failed row is left out
    results = {f"r{n}": {"matmul_params": n, "step_ms": 2.0 * n ** 1.5} for n in (10**6, 10**7, 10**8)}
    results["failed"] = {"error": "out of memory"}
    fit = sizes.growth(results)
    assert fit["points"] == 3 and fit["exponent"] == pytest.approx(1.5)
    counts = sizes.model_counts("95m", 1024)
    assert counts["params"] == 95_398_656 and counts["flops_per_token"] == 647_626_752
    with torch.device("meta"):
        norms = sum(p.numel() for p in Transformer(PRESETS["95m"]).parameters() if p.dim() == 1)
    assert counts["matmul_params"] == 95_398_656 - norms


def test_rows_past_the_budget_are_skipped_and_reported(tmp_path):
    out = tmp_path / "sizes.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--rows", "tiny,tiny:2", "--budget-s", "20",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert results["tiny"]["error"] == results["tiny:2"]["error"] == "skipped: under 30 s of --budget-s 20 left"
    assert "[tiny:2] skipped" in proc.stdout and "tok/s," not in proc.stdout  # no row ran


def test_a_row_still_running_at_the_end_of_the_budget_is_killed_and_reported(tmp_path):
    """run_row gets the seconds the budget has left as its timeout: a trainer that needs longer is killed."""
    import argparse

    sizes = load_script()
    a = argparse.Namespace(steps=4, log_interval=2, row_timeout_s=0, batch=4, seq_len=32, device="cpu", skip=None)
    t0 = time.time()
    result = sizes.run_row(sizes.parse_rows("tiny")[0], a, tmp_path, seconds_left=1.0)
    assert result["error"] == "timed out after 1 s" and time.time() - t0 < 30
