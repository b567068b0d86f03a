"""Tests for bitnet.status, the read-only run monitor, on synthetic run directories (CPU, < 5 s)."""
import ast
import base64
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:  # also runs from a fresh clone before `pip install -e .`
    sys.path.insert(0, str(SRC))

from bitnet import status  # noqa: E402
from bitnet.cli import status as status_cli  # noqa: E402

T0 = 1_700_000_000.0
NUM_STEPS = 1000
N_ROWS = 100
TOKENS_PER_STEP = 32 * 1024


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def fake_checkpoint(step_dir: Path) -> Path:
    """A step directory as checkpoint.save leaves it, as far as the monitor looks (a manifest and a file of the
    size it records; the monitor never hashes or loads it)."""
    step_dir.mkdir(parents=True)
    (step_dir / "checkpoint.pt").write_bytes(b"weights" * 10)
    (step_dir / "meta.json").write_text(json.dumps({"step": int(step_dir.name[5:]), "sha256": "0" * 64, "bytes": 70}))
    return step_dir


def make_run(root: Path, *, n_rows=N_ROWS, evals=True, samples=True, quant=True, anomalies=True,
             checkpoints=True, scalars=True) -> Path:
    """A run dir as a trainer would leave it. Row i (1-based step): loss 10 - 0.05 i, step_ms alternating
    200/300 (median 250), wall time 0.5 s per step, 4 grad-accum micro-steps per optimizer step."""
    run = root / "runs" / "demo-run"
    (run / "meta").mkdir(parents=True)
    (run / "meta/config.json").write_text(json.dumps({
        "model": {"vocab_size": 32000, "dim": 768, "n_layers": 12, "n_heads": 12},
        "train": {"num_steps": NUM_STEPS, "batch_size": 32, "seq_len": 1024, "grad_accum": 4},
        "data": {"source": "embedded"}}))
    (run / "meta/provenance.json").write_text(json.dumps({
        "git_commit": "0123456789abcdef", "git_dirty": True, "command": "bitnet train", "host": "box",
        "gpu": "NVIDIA H100", "seed": 1337, "start_time": T0, "resumed_from": None}))
    if scalars:
        _write_jsonl(run / "metrics/scalars.jsonl", [
            {"step": i, "tokens": i * TOKENS_PER_STEP, "loss": 10 - 0.05 * i, "lr": 1e-3, "wd": 0.1,
             "grad_norm": 1.0 + 0.01 * i, "step_ms": 200.0 if i % 2 else 300.0, "tok_s": 100_000.0 + i,
             "mem_gib": 10.0 + i / 100, "time": T0 + 0.5 * i} for i in range(1, n_rows + 1)])
    if evals:
        _write_jsonl(run / "eval/eval_results.jsonl", [
            {"step": 50, "tokens": 50 * TOKENS_PER_STEP, "eval_loss": 7.75, "eval_ppl": math.exp(7.75),
             "train_loss": 7.5, "gap": 0.25, "time": T0 + 25},
            {"step": 100, "tokens": 100 * TOKENS_PER_STEP, "eval_loss": 5.3, "eval_ppl": math.exp(5.3),
             "train_loss": 5.0, "gap": 0.3, "time": T0 + 50}])
    if samples:
        _write_jsonl(run / "samples/samples.jsonl", [
            {"step": step, "prompt": "The", "mode": mode, "seed": 0, "text": f"step {step} {mode} " + "word " * 60,
             "token_ids": [1, 2, 3], "mean_entropy": 2.5, "max_repetition": 3, "unique_ratio": 0.5, "top5": []}
            for step in (50, 100) for mode in ("greedy", "typical", "stress")])
    if quant:
        _write_jsonl(run / "metrics/quant.jsonl", [
            {"step": 10, "layers": {"layers.0.attn.q_proj": {"neg": 0.3, "zero": 0.4, "pos": 0.3, "gamma": 0.02}},
             "groups": {"attn": {"neg": 0.3, "zero": 0.4, "pos": 0.3}, "ffn": {"neg": 0.31, "zero": 0.38, "pos": 0.31}}},
            {"step": 100, "layers": {}, "groups": {"attn": {"neg": 0.25, "zero": 0.5, "pos": 0.25},
                                                  "ffn": {"neg": 0.2, "zero": 0.6, "pos": 0.2}}}])
    if anomalies:
        for step, event in ((42, "loss_spike"), (77, "grad_norm")):
            d = run / f"anomalies/step_{step:06d}_{event}"
            d.mkdir(parents=True)
            (d / "info.json").write_text(json.dumps({"step": step, "event": event, "message": f"{event} at {step}"}))
    if checkpoints:
        for name in ("step_000050", "step_000080"):
            fake_checkpoint(run / "checkpoints" / name)
        (run / "checkpoints/step_000100.tmp").mkdir()
    return run


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path)


def snapshot(root: Path) -> dict:
    """Every path under root with its mtime (dirs included) and file content hash."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        snap[str(d)] = ("dir", d.stat().st_mtime_ns, tuple(sorted(dirnames + filenames)))
        for name in filenames:
            p = d / name
            snap[str(p)] = ("file", p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return snap


def test_summary_numbers(run):
    s = status.summarize(run, smoothing=20, now=T0 + 0.5 * N_ROWS + 3)
    assert s["run_id"] == "demo-run"
    assert s["step"] == 100 and s["num_steps"] == NUM_STEPS
    assert s["pct_done"] == pytest.approx(10.0)  # optimizer steps: grad_accum=4 must not change it
    assert s["tokens"] == 100 * TOKENS_PER_STEP
    assert s["loss"] == pytest.approx(5.0)
    assert s["loss_smoothed"] == pytest.approx(10 - 0.05 * 90.5)  # mean over steps 81..100
    assert s["step_ms"] == pytest.approx(250.0)
    assert s["tok_s"] == pytest.approx(100_090.5)  # median of steps 81..100
    assert s["eta_s"] == pytest.approx(900 * 0.25)  # remaining steps * median step_ms
    assert s["eta_wall_s"] == pytest.approx(900 * 0.5)  # remaining steps * wall seconds per step
    assert s["elapsed_s"] == pytest.approx(100 * 0.5)  # from the process start (T0) to the last row
    assert s["tok_s_sustained"] == pytest.approx(100 * TOKENS_PER_STEP / 50.0)  # tokens from 0 over that span
    assert s["last_row_age_s"] == pytest.approx(3.0) and s["stalled"] is False
    assert s["mem_gib"] == pytest.approx(11.0)
    assert s["eval"]["step"] == 100 and s["eval"]["gap"] == pytest.approx(0.3)
    assert s["eval"]["eval_ppl"] == pytest.approx(math.exp(5.3))
    assert s["samples"]["step"] == 100 and [m["mode"] for m in s["samples"]["modes"]] == ["greedy", "typical", "stress"]
    assert s["quant"]["first_step"] == 10 and s["quant"]["latest"]["ffn"]["zero"] == pytest.approx(0.6)
    assert s["anomalies"]["count"] == 2 and s["anomalies"]["latest_message"] == "grad_norm at 77"
    assert s["checkpoints"] == {"latest_step": 80, "count": 2, "incomplete": 1, "broken": [], "deleting": []}


def test_stalled_and_finished(tmp_path):
    run = make_run(tmp_path)
    last = T0 + 0.5 * N_ROWS
    assert status.summarize(run, now=last + 1000)["stalled"] is True
    done = make_run(tmp_path / "b", n_rows=NUM_STEPS)
    s = status.summarize(done, now=T0 + 0.5 * NUM_STEPS + 1000)
    assert s["finished"] and s["stalled"] is False and s["eta_s"] == 0
    assert "stalled?" in status.render_text(status.summarize(run, now=last + 1000))


def test_gap_computed_when_missing(tmp_path):
    run = make_run(tmp_path, evals=False)
    _write_jsonl(run / "eval/eval_results.jsonl", [{"step": 100, "eval_loss": 5.5, "train_loss": 5.0}])
    e = status.summarize(run)["eval"]
    assert e["gap"] == pytest.approx(0.5) and e["eval_ppl"] == pytest.approx(math.exp(5.5))


def test_text_screen(run, capsys):
    assert status_cli.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "demo-run" in out and "step 100 / 1,000 (10.00%)" in out and "3.3M" in out
    assert "5.4750 (mean of last 20 rows)" in out
    assert "gap +0.3000" in out and "step_000077_grad_norm" in out and "checkpoint step 80" in out
    sample_lines = [ln for ln in out.splitlines() if ln.lstrip().startswith(("greedy", "typical", "stress"))]
    assert len(sample_lines) == 3 and all(len(ln) < 120 and "..." in ln for ln in sample_lines)
    assert "attn  -1/0/+1 0.300/0.400/0.300 (step 10) -> 0.250/0.500/0.250 (step 100)" in out


def test_the_gpu_clock_and_power_of_the_last_row_are_shown(tmp_path, capsys):
    run = make_run(tmp_path)
    rows = [json.loads(line) for line in (run / "metrics/scalars.jsonl").read_text().splitlines()]
    rows[-1].update(gpu_sm_mhz=1755, gpu_power_w=690.4)
    _write_jsonl(run / "metrics/scalars.jsonl", rows)
    assert status_cli.main([str(run)]) == 0
    assert "GPU 1,755 MHz 690 W" in capsys.readouterr().out
    rows[-1]["gpu_power_w"] = None  # a row without both (CPU runs, no NVML) shows neither
    _write_jsonl(run / "metrics/scalars.jsonl", rows)
    assert status_cli.main([str(run)]) == 0
    assert "MHz" not in capsys.readouterr().out


def test_smoothing_flag_and_json(run, capsys):
    assert status_cli.main([str(run), "--json", "--smoothing", "5"]) == 0
    s = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert s["loss_smoothed"] == pytest.approx(10 - 0.05 * 98)  # mean over steps 96..100
    assert s["pct_done"] == pytest.approx(10.0) and s["eta_s"] == pytest.approx(225.0)
    assert s["eval"]["gap"] == pytest.approx(0.3) and s["checkpoints"]["latest_step"] == 80


def test_torn_last_lines_are_skipped(run, capsys):
    for rel in ("metrics/scalars.jsonl", "eval/eval_results.jsonl", "samples/samples.jsonl", "metrics/quant.jsonl"):
        with open(run / rel, "a") as f:
            f.write('{"step": 101, "tokens": 33')
    s = status.summarize(run)
    assert s["step"] == 100 and s["rows"] == N_ROWS and s["eval"]["step"] == 100
    assert s["samples"]["step"] == 100 and s["quant"]["latest_step"] == 100
    assert status_cli.main([str(run)]) == 0


def test_missing_optional_files(tmp_path, capsys):
    run = make_run(tmp_path, evals=False, samples=False, quant=False, anomalies=False, checkpoints=False)
    assert status_cli.main([str(run)]) == 0
    out = capsys.readouterr().out
    for topic in ("eval", "samples", "quant", "anomalies", "checkpoint"):
        assert re.search(rf"^{topic}\s+none yet", out, re.M), topic


def test_run_just_started(tmp_path, capsys):
    run = make_run(tmp_path, scalars=False, evals=False, samples=False, quant=False, anomalies=False,
                   checkpoints=False)
    assert status_cli.main([str(run)]) == 0
    assert "no scalar rows yet" in capsys.readouterr().out
    assert status_cli.main([str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] is None
    assert status_cli.main([str(run), "--plot", str(tmp_path / "empty.png")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'empty.png'} (step n/a)\n"
    assert (tmp_path / "empty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # panels say "no data yet"


def test_odd_values_do_not_crash(tmp_path, capsys):
    run = make_run(tmp_path)
    with open(run / "metrics/scalars.jsonl", "a") as f:
        f.write('{"step": 101, "loss": NaN, "lr": null, "grad_norm": "big", "time": Infinity}\n')
        f.write('{"step": null, "loss": 1.0}\n["not", "a", "dict"]\n{}\n')
    with open(run / "eval/eval_results.jsonl", "a") as f:
        f.write('{"step": 120, "eval_loss": NaN, "gap": null}\n')
    with open(run / "samples/samples.jsonl", "a") as f:
        f.write('{"step": 120, "text": null}\n')
    with open(run / "metrics/quant.jsonl", "a") as f:
        f.write('{"step": 120, "groups": {"attn": {"neg": null}}}\n')
    s = status.summarize(run)
    assert s["step"] == 101 and s["loss"] is None and s["lr"] is None
    assert s["loss_smoothed"] == pytest.approx(10 - 0.05 * 91)  # last 20 rows, the NaN one left out
    assert status_cli.main([str(run)]) == 0
    assert "nan (last)" in capsys.readouterr().out
    assert status_cli.main([str(run), "--json"]) == 0
    json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert status_cli.main([str(run), "--plot", str(tmp_path / "odd.png")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'odd.png'} (step 101)\n"
    assert (tmp_path / "odd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resumed_steps_keep_the_last_row(tmp_path):
    run = make_run(tmp_path)
    with open(run / "metrics/scalars.jsonl", "a") as f:  # resumed from step 90: steps 91..100 logged again
        for i in range(91, 101):
            f.write(json.dumps({"step": i, "loss": 1.0, "time": T0 + 1000 + 0.5 * i}) + "\n")
    s = status.summarize(run, smoothing=10)
    assert s["rows"] == N_ROWS and s["loss_smoothed"] == pytest.approx(1.0)


def test_plot_png_and_html(run, tmp_path):
    out_png, out_html = tmp_path / "out" / "dash.png", tmp_path / "out" / "dash.html"
    out_png.parent.mkdir()
    assert status_cli.main([str(run), "--plot", str(out_png)]) == 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert status_cli.main([str(run), "--plot", str(out_html)]) == 0
    page = out_html.read_text()
    b64 = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1)
    assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n" and "demo-run" in page
    assert sorted(p.name for p in out_png.parent.iterdir()) == ["dash.html", "dash.png"]  # no temp left


def test_status_never_writes_into_the_run(run, tmp_path, capsys):
    before = snapshot(run)
    assert status_cli.main([str(run)]) == 0
    assert status_cli.main([str(run), "--json"]) == 0
    assert status_cli.main([str(run), "--plot", str(tmp_path / "outside.png")]) == 0
    assert status_cli.main([str(run), "--plot", str(tmp_path / "outside.html")]) == 0
    assert status.watch(lambda: status.render_text(status.summarize(run)), 0.01, max_iterations=2,
                        sleep=lambda _: None) == 0
    assert snapshot(run) == before


@pytest.mark.parametrize("inside", ["dash.png", "metrics/dash.html", "."])
def test_plot_inside_the_run_is_refused(run, capsys, inside):
    before = snapshot(run)
    assert status_cli.main([str(run), "--plot", str(run / inside)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refusing") and err.count("\n") == 1
    assert snapshot(run) == before


def test_plot_refused_through_a_relative_path(run, capsys, monkeypatch):
    monkeypatch.chdir(run / "metrics")
    before = snapshot(run)
    assert status_cli.main([str(run), "--plot", "../x.png"]) == 2
    assert snapshot(run) == before


@pytest.mark.parametrize("argv", [["/nonexistent/run"], ["{tmp}"], ["{tmp}/file"], [], ["{run}", "--smoothing", "0"],
                                  ["{run}", "--watch", "-1"], ["{run}", "--watch", "inf"], ["{run}", "--bogus"]])
def test_bad_input_is_one_line_exit_2(tmp_path, run, capsys, argv):
    (tmp_path / "file").write_text("x")
    argv = [a.format(tmp=tmp_path, run=run) for a in argv]
    assert status_cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and captured.out == ""


def test_watch_stops_cleanly_on_ctrl_c(run, capsys, monkeypatch):
    def interrupt(_seconds):
        raise KeyboardInterrupt
    monkeypatch.setattr(status.time, "sleep", interrupt)
    assert status_cli.main([str(run), "--watch", "0.01"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("\033[2J\033[H") and "step 100 / 1,000" in out
    assert status_cli.main(["--watch", str(run)]) == 0  # default interval, run dir after a bare --watch
    assert "refresh every 10s" in capsys.readouterr().out


def test_watch_max_iterations_and_json_lines(run, capsys, monkeypatch):
    monkeypatch.setattr(status.time, "sleep", lambda _s: None)
    calls = []
    assert status.watch(lambda: calls.append(1) or "frame", 0.01, max_iterations=3) == 0
    assert len(calls) == 3 and capsys.readouterr().out.count("\033[2J") == 3
    monkeypatch.setattr(status.time, "sleep", lambda _s: (_ for _ in ()).throw(KeyboardInterrupt))
    assert status_cli.main([str(run), "--watch", "1", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[0])["step"] == 100 and "\033" not in lines[0]


@pytest.mark.parametrize("spoil, problem", [
    (lambda d: (d / "meta.json").unlink(), "no meta.json"),
    (lambda d: (d / "meta.json").write_text('{"step": 80, "sha'), "meta.json unreadable"),
    (lambda d: (d / "meta.json").write_text("[1, 2]"), "meta.json is no checkpoint manifest"),
    (lambda d: (d / "meta.json").write_text("{}"), "meta.json is no checkpoint manifest"),
    (lambda d: (d / "checkpoint.pt").unlink(), "no checkpoint.pt"),
    (lambda d: (d / "checkpoint.pt").write_bytes(b"w" * 20), "checkpoint.pt has 20 bytes, meta.json records 70"),
])
def test_a_broken_newest_checkpoint_is_named_and_not_taken_for_the_resume_point(run, capsys, spoil, problem):
    spoil(run / "checkpoints" / "step_000080")
    s = status.summarize(run)
    assert s["checkpoints"] == {"latest_step": 50, "count": 1, "incomplete": 1,
                                "broken": [{"name": "step_000080", "problem": problem}], "deleting": []}
    assert status_cli.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint step 50 (1 complete), 1 in progress" in out
    assert f"BROKEN     1 checkpoint(s), not usable to resume: step_000080 ({problem})" in out


def test_a_pruned_dir_left_by_a_kill_is_listed_not_hidden(run, capsys):
    """A kill mid-prune leaves step_XXXXXX.deleting; the run's continuation prunes its own directory, so the
    killed run keeps it: the monitor names it (it is never a checkpoint)."""
    left = run / "checkpoints" / "step_000020.deleting"
    left.mkdir()
    (left / "checkpoint.pt").write_bytes(b"half")
    ck = status.summarize(run)["checkpoints"]
    assert ck["latest_step"] == 80 and ck["count"] == 2 and ck["deleting"] == ["demo-run/checkpoints/step_000020.deleting"]
    assert status_cli.main([str(run)]) == 0
    assert ("pruned     1 checkpoint dir(s) being deleted or left by a kill (safe to remove): "
            "demo-run/checkpoints/step_000020.deleting") in capsys.readouterr().out


def test_a_manifest_without_a_size_is_not_judged_by_size(run):
    """Checkpoints written before meta.json recorded "bytes" are taken on their manifest alone."""
    d = run / "checkpoints" / "step_000080"
    (d / "meta.json").write_text(json.dumps({"step": 80, "sha256": "0" * 64}))
    assert status.summarize(run)["checkpoints"]["latest_step"] == 80


def test_watch_frames_of_a_growing_run_match_a_fresh_read(run, capsys, monkeypatch):
    """--watch keeps one JsonlReader across refreshes (only appended rows are parsed): every frame must
    still equal a summary read from scratch at that moment, rows, evals and a torn last line included."""
    scalars, evals = run / "metrics/scalars.jsonl", run / "eval/eval_results.jsonl"
    fresh, frames = [], 0

    def row(i: int) -> str:
        return json.dumps({"step": i, "tokens": i * TOKENS_PER_STEP, "loss": 5.0 - i / 1000, "step_ms": 250.0,
                           "tok_s": 1e5, "time": T0 + 0.5 * i}) + "\n"
    torn = ""

    def grow(_seconds):  # between frames: 10 more rows, the last one cut mid-line (completed next time)
        nonlocal frames, torn
        fresh.append(status.summarize(run))
        frames += 1
        if frames == 3:
            raise KeyboardInterrupt
        with open(scalars, "a") as f:
            text = torn + "".join(row(i) for i in range(N_ROWS + 10 * frames - 9, N_ROWS + 10 * frames + 2))
            cut = len(text) - len(row(N_ROWS + 10 * frames + 1)) // 2
            f.write(text[:cut])
            torn = text[cut:]
        with open(evals, "a") as f:
            f.write(json.dumps({"step": N_ROWS + 10 * frames, "eval_loss": 4.0 - frames, "time": T0}) + "\n")
    monkeypatch.setattr(status.time, "sleep", grow)
    assert status_cli.main([str(run), "--watch", "1", "--json"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [s["step"] for s in shown] == [100, 110, 120]
    assert [s["eval"]["eval_loss"] for s in shown] == [5.3, 3.0, 2.0]
    for frame, expected in zip(shown, fresh):
        for clock in ("now", "last_row_age_s"):
            frame.pop(clock), expected.pop(clock)
        assert frame == json.loads(status.render_json(expected))


def test_imports_only_the_standard_library():
    """Top-level imports are stdlib; matplotlib may appear only inside functions (plot is lazy). The run
    directory's names, its JSONL reader, its continuation names and the startup row's line (bitnet.run.layout,
    bitnet.run.jsonl, bitnet.run.directory, bitnet.run.startup) are the only bitnet modules it imports, and they
    hold to the same rule."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    allowed = {"bitnet.run.layout", "bitnet.run.jsonl", "bitnet.run.directory", "bitnet.run.startup"}

    def imports(nodes):
        return {(a.name if isinstance(n, ast.Import) else n.module)
                for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}

    def roots(names):
        return {name.split(".")[0] for name in names if name not in allowed and name != "bitnet.run"}
    import bitnet.run
    files = [Path(status.__file__)] + [Path(bitnet.run.__file__).with_name(m.split(".")[-1] + ".py") for m in allowed]
    files.append(Path(bitnet.run.__file__))
    for path in files:
        tree = ast.parse(path.read_text())
        assert roots(imports(tree.body)) <= stdlib, (path.name, roots(imports(tree.body)))
        assert roots(imports(ast.walk(tree))) <= stdlib | {"matplotlib"}, (path.name, roots(imports(ast.walk(tree))))
    assert imports(ast.parse(Path(bitnet.run.__file__).read_text()).body) == set()
    code = "import sys, bitnet.status; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("argv", [["--watch", "10"], ["--json"], ["--watch"]])
def test_no_run_dir_is_one_clear_error(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)  # no directory named "10" here
    assert status_cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == ("error: a run directory is required: bitnet-status runs/<id> [--watch [SECONDS]] "
                            "[--json] [--plot OUT]\n") and captured.out == ""


def test_usage_line_shows_the_run_dir_as_required(capsys):
    with pytest.raises(SystemExit):
        status_cli.main(["--help"])
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage.startswith("usage: bitnet-status RUN_DIR [--watch [SECONDS]]") and "[RUN_DIR]" not in usage


def test_watch_stops_on_a_finished_run(tmp_path, capsys, monkeypatch):
    done = make_run(tmp_path, n_rows=NUM_STEPS)
    sleeps = []
    monkeypatch.setattr(status.time, "sleep", sleeps.append)
    assert status_cli.main([str(done), "--watch", "5"]) == 0
    out = capsys.readouterr().out
    assert sleeps == [] and out.count("\033[2J") == 1  # one frame, then it returns
    assert "FINISHED" in out and "the run has finished; stopped watching" in out
    assert status_cli.main([str(done), "--watch", "5", "--json"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 and sleeps == []


def test_json_tokens_is_an_integer(run, capsys):
    assert status_cli.main([str(run), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["tokens"] == 100 * TOKENS_PER_STEP and type(s["tokens"]) is int and type(s["step"]) is int


@pytest.mark.parametrize("n_rows, window", [(3, 1), (30, 6), (100, 20), (1000, 20)])
def test_smoothing_window_scales_with_the_run(tmp_path, n_rows, window, capsys):
    run = make_run(tmp_path, n_rows=n_rows)
    s = status.summarize(run)
    assert s["smoothing"] == window
    assert s["loss_smoothed"] == pytest.approx(10 - 0.05 * (n_rows - (window - 1) / 2))  # mean of the last `window`
    assert status.summarize(run, smoothing=2)["smoothing"] == 2  # --smoothing wins
    assert status_cli.main([str(run)]) == 0
    assert f"(mean of last {window} rows)" in capsys.readouterr().out


def test_a_bf16_twin_says_quant_does_not_apply(tmp_path, capsys):
    run = make_run(tmp_path, quant=False)
    config = json.loads((run / "meta/config.json").read_text())
    assert status_cli.main([str(run)]) == 0
    assert "quant      none yet" in capsys.readouterr().out  # a BitNet run whose stats have not come yet
    config["model"]["quantization"] = "none"
    (run / "meta/config.json").write_text(json.dumps(config))
    assert status_cli.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "quant      n/a (quantization none: no ternary layers)" in out and "none yet" not in out.split("quant")[1]


def add_leg(runs: Path, name: str, resumed_from: str, start: float, steps: range, anomalies=(), checkpoints=()) -> Path:
    """A continuation as `--resume-from` leaves it: its own directory whose provenance names the checkpoint."""
    run = runs / name
    (run / "meta").mkdir(parents=True)
    (run / "meta/config.json").write_text(json.dumps({"train": {"num_steps": NUM_STEPS}}))
    (run / "meta/provenance.json").write_text(json.dumps({"start_time": start, "resumed_from": resumed_from}))
    _write_jsonl(run / "metrics/scalars.jsonl", [
        {"step": i, "tokens": i * TOKENS_PER_STEP, "loss": 1.0 + i / 1000, "step_ms": 100.0, "tok_s": 300_000.0,
         "time": start + 10 + 0.5 * (i - steps[0])} for i in steps])
    _write_jsonl(run / "eval/eval_results.jsonl", [{"step": steps[-1], "eval_loss": 1.5, "train_loss": 1.2}])
    for step, event in anomalies:
        d = run / f"anomalies/step_{step:06d}_{event}"
        d.mkdir(parents=True)
        (d / "info.json").write_text(json.dumps({"step": step, "event": event, "message": f"{event} at {step} again"}))
    for step in checkpoints:
        fake_checkpoint(run / "checkpoints" / f"step_{step:06d}")
    return run


@pytest.fixture
def two_legs(tmp_path):
    """demo-run (steps 1-100, killed; checkpoint 80 complete) and demo-run_r80, which resumed from step 80
    and redid 81-100 on its way to 150. The kill fell after step 100: the anomaly of step 90 was dumped
    by both legs. resumed_from holds the path as the trainer was given it, from another directory."""
    first = make_run(tmp_path)
    d = first / "anomalies/step_000090_loss_spike"
    d.mkdir()
    (d / "info.json").write_text(json.dumps({"step": 90, "event": "loss_spike", "message": "loss_spike at 90"}))
    second = add_leg(first.parent, "demo-run_r80", "elsewhere/runs/demo-run/checkpoints/step_000080", T0 + 300,
                     range(81, 151), anomalies=((90, "loss_spike"), (120, "grad_norm")), checkpoints=(150,))
    return first, second


def test_a_resumed_run_is_summarized_over_its_legs(two_legs):
    first, second = two_legs
    s = status.summarize(second, smoothing=70, now=T0 + 400)
    assert [(leg["run_id"], leg["resumed_step"], leg["first_step"], leg["last_step"]) for leg in s["legs"]] == [
        ("demo-run", None, 1, 100), ("demo-run_r80", 80, 81, 150)]
    assert s["step"] == 150 and s["rows"] == 150 and s["tokens"] == 150 * TOKENS_PER_STEP
    # steps 81-100 are the resumed leg's rows
    assert s["loss_smoothed"] == pytest.approx(statistics_mean(1.0 + i / 1000 for i in range(81, 151)))
    # elapsed: 1-100 took 50 s from the process start; the continuation 10 s of setup + 69 x 0.5 s
    assert s["elapsed_s"] == pytest.approx(50 + 10 + 34.5)
    assert s["tok_s_sustained"] == pytest.approx(150 * TOKENS_PER_STEP / 94.5)
    assert s["eta_wall_s"] == pytest.approx(850 * 0.5) and s["eta_s"] == pytest.approx(850 * 0.1)
    assert s["eval"]["step"] == 150 and s["samples"]["step"] == 50  # the killed leg's samples at 100: redone
    assert s["quant"]["latest_step"] == 10  # quant 100 was redone; the continuation logged none
    an = s["anomalies"]
    assert an["count"] == 4 and an["repeated_after_resume"] == 1  # 42, 77, 90 (twice), 120
    assert an["latest"] == ["step_000077_grad_norm", "step_000090_loss_spike", "step_000120_grad_norm"]
    assert s["checkpoints"] == {"latest_step": 150, "count": 3, "incomplete": 1, "broken": [], "deleting": []}
    assert s["continued_in"] == [] and s["stalled"] is False
    text = status.render_text(s)
    assert "elapsed 1m34s (2 legs)" in text and f"sustained {150 * TOKENS_PER_STEP / 94.5 / 1e3:.1f}k tok/s" in text
    assert "legs       demo-run (steps 1-100, redone after 80) -> demo-run_r80 (steps 81-150)" in text
    assert "anomalies  4 (latest: " in text and "(1 dumped again by a resumed leg, counted once)" in text


def test_each_leg_counts_from_its_process_start_where_provenance_has_it(two_legs):
    """The 300M-token run (issue 24): provenance is written 8-10 s after the process starts (imports, CUDA,
    data), and the status's sustained rate was 583k tok/s where the processes' wall gave 544k. A leg's
    process_start_time counts from there; one later than start_time (a clock oddity) is not believed."""
    first, second = two_legs
    prov = json.loads((second / "meta/provenance.json").read_text())
    (second / "meta/provenance.json").write_text(json.dumps({**prov, "process_start_time": T0 + 291}))
    s = status.summarize(second, smoothing=70, now=T0 + 400)
    assert s["elapsed_s"] == pytest.approx(50 + 9 + 10 + 34.5)  # the continuation started 9 s before provenance
    (second / "meta/provenance.json").write_text(json.dumps({**prov, "process_start_time": T0 + 305}))
    assert status.summarize(second, smoothing=70, now=T0 + 400)["elapsed_s"] == pytest.approx(50 + 10 + 34.5)


def test_a_continuation_behind_the_killed_leg_cuts_its_redone_steps(tmp_path):
    """Resumed from 80 and now at 90: the killed leg's steps 81-100 (rows, samples, quant) were redone and
    are not shown, though the new leg has not reached 100 yet."""
    first = make_run(tmp_path)
    add_leg(first.parent, "demo-run_r80", "runs/demo-run/checkpoints/step_000080", T0 + 300, range(81, 91))
    s = status.summarize(first.parent / "demo-run_r80", smoothing=10)
    assert s["step"] == 90 and s["rows"] == 90 and s["loss"] == pytest.approx(1.09)
    assert s["loss_smoothed"] == pytest.approx(statistics_mean(1.0 + i / 1000 for i in range(81, 91)))
    assert s["samples"]["step"] == 50 and s["eval"]["step"] == 90 and s["quant"]["latest_step"] == 10
    # a checkpoint the killed leg completed after step 80 is a dead end: the run's newest is still 80
    fake_checkpoint(first / "checkpoints/step_000100")
    assert status.summarize(first.parent / "demo-run_r80")["checkpoints"]["latest_step"] == 80


def test_the_killed_leg_names_its_continuation_and_is_not_stalled(two_legs):
    first, _ = two_legs
    s = status.summarize(first, now=T0 + 10_000)
    assert s["continued_in"] == ["demo-run_r80"] and s["stalled"] is False and len(s["legs"]) == 1
    assert s["step"] == 100 and s["anomalies"]["count"] == 3 and s["anomalies"]["repeated_after_resume"] == 0
    assert "continued  in demo-run_r80 (this leg was resumed there)" in status.render_text(s)


def test_legs_plot_and_odd_links(two_legs, tmp_path, capsys):
    first, second = two_legs
    assert status_cli.main([str(second), "--plot", str(tmp_path / "legs.png")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'legs.png'} (step 150)\n"
    # a checkpoint outside any run directory: one leg, its steps only
    outside = add_leg(first.parent, "other", str(tmp_path / "ckpts/step_000500/checkpoint.pt"), T0, range(501, 511))
    s = status.summarize(outside)
    assert [leg["resumed_step"] for leg in s["legs"]] == [500] and s["elapsed_s"] == pytest.approx(4.5)
    # two directories naming each other (hand-edited files): each read once
    a = add_leg(tmp_path / "loop", "x_r5", "runs/x/checkpoints/step_000005", T0, range(6, 11))
    b = add_leg(tmp_path / "loop", "x", "runs/x_r5/checkpoints/step_000010", T0, range(11, 16))
    assert [leg["run_id"] for leg in status.summarize(a)["legs"]] == ["x", "x_r5"]
    assert [leg["run_id"] for leg in status.summarize(b)["legs"]] == ["x_r5", "x"]


def statistics_mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
