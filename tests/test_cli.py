"""CLI: bad input gives one line, non-zero exit, no traceback, nothing written or overwritten."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet.cli.train import build_parser, train_main
from tests.conftest import fast_args, read_rows

ROOT = Path(__file__).resolve().parents[1]


def tree(path: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))} if path.exists() else {}


BAD = {
    "unknown preset": ["--preset", "huge"],
    "negative steps": ["--num-steps", "-5"],
    "zero batch": ["--batch-size", "0"],
    "seq-len above context": ["--seq-len", "100000"],
    "missing resume file": ["--resume-from", "/nonexistent/checkpoint.pt"],
    "run id with separator": ["--run-id", "../escape"],
    "batch not divisible by micro": ["--batch-size", "6", "--micro-batch-size", "4"],
    "unknown data source": ["--data", "nosuchsource"],
    "bad compile value": ["--compile", "maybe"],
    "unknown fp8 switch": ["--fp8", "head,attention"],
    "activation checkpointing not a count": ["--activation-checkpointing", "half"],
    "more checkpointed blocks than the model has": ["--activation-checkpointing", "99"],
    "unknown residual stream dtype": ["--residual-stream", "fp16"],
    "negative head chunk": ["--head-chunk-rows", "-1"],
    "stage boundary out of range": ["--stage-boundary", "1.5"],
    "missing tokenizer file": ["--tokenizer", "/nonexistent/tokenizer.json"],
    "cuda on a cpu machine": ["--device", "cuda:7"] if not __import__("torch").cuda.is_available() else ["--device", "tpu"],
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_line_and_writes_nothing(name, runs, capsys):
    args = fast_args(runs, "bad") + BAD[name]
    before = tree(runs)
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert tree(runs) == before


def test_corrupt_resume_file(runs, tmp_path, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert train_main(fast_args(runs, "x") + ["--resume-from", str(bad)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (runs / "x").exists()


def test_existing_run_is_not_overwritten(runs, capsys):
    assert train_main(fast_args(runs, "keep", steps=2)) == 0
    before = tree(runs / "keep")
    assert train_main(fast_args(runs, "keep", steps=2)) == 2
    assert "already exists" in capsys.readouterr().err
    assert tree(runs / "keep") == before
    capsys.readouterr()
    assert train_main(fast_args(runs, "keep", steps=3, overwrite=True)) == 0
    # replaced, not appended to: only the new run's rows and config remain
    assert [r["step"] for r in read_rows(runs / "keep" / "metrics" / "scalars.jsonl")] == [1, 2, 3]
    assert json.loads((runs / "keep" / "meta" / "config.json").read_text())["train"]["num_steps"] == 3
    assert tree(runs / "keep") != before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_runs_dir(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert train_main(fast_args(locked / "runs", "r")) == 2
        assert capsys.readouterr().err.startswith("error: ")
    finally:
        locked.chmod(0o700)


def test_unwritable_runs_dir_path_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert train_main(fast_args(blocker, "r")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_config_file_layers_under_flags(runs, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('seq-len = 40\nnum_steps = 3\nlr_peak = 0.002\n[model]\nn_layers = 1\n')
    assert train_main(fast_args(runs, "cfg", steps=2) + ["--config", str(toml)]) == 0
    import json
    cfg = json.loads((runs / "cfg" / "meta" / "config.json").read_text())
    assert cfg["train"]["seq_len"] == 32  # the flag (from fast_args) wins over the file
    assert cfg["train"]["num_steps"] == 2
    assert cfg["train"]["lr_peak"] == 0.002  # from the file
    assert cfg["model"]["n_layers"] == 1


@pytest.mark.parametrize("content,suffix,msg", [
    ("num_steps = 'ten'\n", ".toml", "must be int"),
    ("bogus_key = 1\n", ".toml", "unknown key"),
    ("num_steps: [1, 2\n", ".yaml", "cannot parse"),
    ("__import__('os').system('echo pwned')\n", ".toml", "cannot parse"),
])
def test_bad_config_files(runs, tmp_path, capsys, content, suffix, msg):
    f = tmp_path / f"bad{suffix}"
    f.write_text(content)
    assert train_main(fast_args(runs, "c") + ["--config", str(f)]) == 2
    assert msg in capsys.readouterr().err
    assert not runs.exists()


def test_help_documents_every_seed_flag():
    text = build_parser().format_help()
    for flag in ["--run-id", "--batch-size", "--seq-len", "--num-steps", "--device", "--seed", "--no-eval",
                 "--log-interval", "--checkpoint-interval", "--sample-interval", "--eval-interval",
                 "--resume-from", "--preset", "--data", "--tokenizer", "--config", "--compile"]:
        assert flag in text, flag


def test_console_script_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bitnet.cli", "--preset", "nope"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown preset 'nope' (known: 95m, tiny, 700m, 1.3b, 3b)"


def _help_entries() -> dict[str, str]:
    """flag -> its help text, whitespace-joined, from `bitnet-train --help`."""
    parser = build_parser()
    return {a.option_strings[0]: " ".join(parser._get_formatter()._expand_help(a).split())
            for a in parser._actions if a.option_strings and a.help}


def test_help_resume_from_names_auto_and_run_dirs():
    text = _help_entries()["--resume-from"]
    assert "'auto'" in text and "a run directory" in text and "checkpoint.pt" in text and "step directory" in text


def test_help_prints_each_default_once_with_the_tiny_preset_beside_it():
    entries = _help_entries()
    doubled = [flag for flag, text in entries.items() if text.count("(default:") > 1]
    assert doubled == []
    assert "(default: )" not in " ".join(entries.values())
    assert entries["--batch-size"].endswith("(default: 32; tiny: 8)")
    assert entries["--num-steps"].endswith("(default: 400000; tiny: 150)")
    assert entries["--data"].endswith("(default: fineweb-edu; tiny: embedded)")
    assert entries["--seed"].endswith("(default: 42)")  # the same for both presets
    epilog = " ".join(build_parser().epilog.split())
    assert "the 95m preset's" in epilog and "--preset tiny" in epilog
    assert "these defaults < the preset's < the resumed checkpoint's config (--resume-from) < the --config file < " \
           "flags" in epilog


def test_help_shows_the_choices_of_closed_flags():
    usage = " ".join(build_parser().format_usage().split())
    for flag, choices in (("--preset", "{95m,tiny,700m,1.3b,3b}"), ("--compile", "{auto,on,off}"),
                          ("--parallel", "{ddp,fsdp2}"), ("--residual-stream", "{bf16,fp32}"),
                          ("--anomaly-policy", "{warn,skip,stop}"), ("--cuda-graphs", "{auto,on,off}"),
                          ("--on-checkpoint-error", "{stop,continue}")):
        assert f"[{flag} {choices}]" in usage, flag


def test_redirected_output_has_plain_lines_not_a_bar(runs, capsys):
    # under pytest stdout/stderr are not terminals, as with `bitnet-train ... > log 2>&1`
    assert train_main(fast_args(runs, "plain", steps=4, log_interval=2)[:-1]) == 0  # without --quiet
    out, err = capsys.readouterr()
    assert "\r" not in out + err and "it/s" not in err  # no tqdm redraws
    startup = [ln for ln in out.splitlines() if " s after start: " in ln]  # the time to the first step, once
    assert len(startup) == 1 and startup[0].startswith("step 1 done ") and "first step " in startup[0]
    lines = [ln for ln in out.splitlines() if ln not in startup]
    assert lines[0].startswith(f"run {runs / 'plain'} | ") and "steps 1..4" in lines[0]
    assert [ln.split(" | ")[0] for ln in lines[1:3]] == ["step 2/4", "step 4/4"]
    assert all(" | loss " in ln and ln.endswith("tok/s") for ln in lines[1:3])
    assert lines[3].startswith(f"done: {runs / 'plain'} at step 4")
