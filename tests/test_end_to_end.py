"""End to end: the quick-start command and the seed's 10-step script, run as a user would."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

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
    # verbatim from the repository root, as the seed's README writes it
    env = {**os.environ, "RUNS_DIR": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["./test_training_10steps.sh"], capture_output=True, cwd=ROOT, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "OK: 10 steps" in out and "FAIL" not in out
    for check in ("meta", "checkpoints", "scalars", "eval", "samples", "quant", "anomalies", "status", "git"):
        assert f"ok    {check} " in out, check
    steps = sorted(p.name for p in (tmp_path / "test_10steps" / "checkpoints").iterdir())
    assert steps == ["step_000000", "step_000004", "step_000005", "step_000010"]


def test_seed_10_step_script_fails_loudly_when_the_status_tool_cannot_import(tmp_path):
    # a sitecustomize on PYTHONPATH makes `import bitnet.status` fail, as a broken install would
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'bitnet.status':\n"
        "            raise ImportError('bitnet.status is broken (test)')\n"
        "sys.meta_path.insert(0, Block())\n")
    env = {**os.environ, "RUNS_DIR": str(tmp_path / "runs"), "PYTHON": sys.executable, "PYTHONPATH": str(block)}
    proc = subprocess.run(["bash", str(ROOT / "test_training_10steps.sh")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 1
    assert "bitnet.status is broken (test)" in proc.stderr and "FAIL: cannot import bitnet.cli / bitnet.status" in proc.stderr
    assert "OK:" not in proc.stdout and not (tmp_path / "runs").exists()  # failed before training


def test_check_run_tree_reports_each_missing_piece(tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    assert train_main(["--preset", "tiny", "--runs-dir", str(tmp_path / "runs"), "--run-id", "r", "--num-steps", "4",
                       "--batch-size", "2", "--seq-len", "32", "--log-interval", "1", "--eval-interval", "2",
                       "--eval-sequences", "2", "--sample-interval", "2", "--sample-max-tokens", "4",
                       "--quant-interval", "2", "--checkpoint-interval", "2", "--quiet"]) == 0
    (run / "samples" / "samples.jsonl").write_text("".join(
        line + "\n" for line in (run / "samples" / "samples.jsonl").read_text().splitlines()
        if json.loads(line)["mode"] != "stress"))  # one mode lost
    (run / "metrics" / "quant.jsonl").unlink()
    argv = [str(run), "--steps", "4", "--checkpoints", "0,1,2,4", "--samples", "2,4"]
    with pytest.raises(SystemExit) as exit_:
        sys_argv, sys.argv = sys.argv, ["check_run_tree.py", *argv]
        try:
            runpy.run_path(str(ROOT / "scripts" / "check_run_tree.py"), run_name="__main__")
        finally:
            sys.argv = sys_argv
    out = capsys.readouterr().out
    assert exit_.value.code == 1
    assert "ok    meta" in out and "ok    checkpoints" in out and "ok    eval" in out
    assert "FAIL  samples" in out and "modes ['greedy', 'typical']" in out
    assert "FAIL  quant" in out and "quant.jsonl" in out


def _capture_train(monkeypatch) -> list:
    """Replace the training loop: record the resolved configs, train nothing."""
    from bitnet.train import loop

    seen = []

    def fake_train(cfg, model_cfg, resume=None, resumed_from=None, quiet=False):
        seen.append((cfg, model_cfg, resumed_from))
        return loop.RunResult(run_dir=Path(cfg.runs_dir) / "x", step=0, tokens=0, last_loss=0.0)

    monkeypatch.setattr(loop, "train", fake_train)
    return seen


def _run_root_script(name: str, argv: list[str]) -> int:
    sys_argv, sys.argv = sys.argv, [name, *argv]
    try:
        runpy.run_path(str(ROOT / name), run_name="__main__")
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = sys_argv
    return 0


def test_train_bitnet_95m_defaults_to_95m_but_never_overrides_a_file_or_checkpoint_preset(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    assert train_main(["--preset", "tiny", "--runs-dir", str(runs), "--run-id", "t", "--num-steps", "2",
                       "--batch-size", "2", "--seq-len", "16", "--no-eval", "--sample-interval", "0", "--quiet"]) == 0
    seen = _capture_train(monkeypatch)
    (tmp_path / "tiny.toml").write_text('preset = "tiny"\nnum_steps = 7\n')
    assert _run_root_script("train_bitnet_95m.py", ["--runs-dir", str(runs), "--quiet"]) == 0
    assert _run_root_script("train_bitnet_95m.py", ["--config", str(tmp_path / "tiny.toml"), "--runs-dir", str(runs),
                                                    "--quiet"]) == 0
    assert _run_root_script("train_bitnet_95m.py", ["--resume-from", str(runs / "t"), "--num-steps", "4",
                                                    "--quiet"]) == 0
    (default, _, _), (from_file, _, _), (resumed, resumed_model, resumed_from) = seen
    assert default.preset == "95m" and default.batch_size == 32 and default.num_steps == 400_000
    assert from_file.preset == "tiny" and from_file.num_steps == 7 and from_file.batch_size == 8
    assert resumed.preset == "tiny" and resumed_model.dim == 64 and resumed.seq_len == 16
    assert resumed_from == str(runs / "t" / "checkpoints" / "step_000002")  # the run dir's newest checkpoint


def test_root_scripts_help_verbatim():
    for cmd, want in ((["python3", "train_bitnet_95m.py", "--help"], "usage: train_bitnet_95m.py"),
                      (["python3", "check_training_status.py", "--help"], "usage: bitnet-status RUN_DIR")):
        proc = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith(want), proc.stdout + proc.stderr
