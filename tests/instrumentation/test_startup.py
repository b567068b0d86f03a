"""instrumentation/startup.py: a run's time to its first step, split into phases (metrics/startup.jsonl)."""

import json
import time

import pytest

from bitnet import status
from bitnet.cli.train import train_main
from bitnet.instrumentation import startup as startup_mod
from bitnet.instrumentation.startup import StartupClock
from bitnet.run import layout
from bitnet.run.startup import startup_line
from tests.conftest import fast_args

PHASES = ["imports", "data", "model", "run_dir", "step_fn", "hooks", "hooks_start", "initial_checkpoint", "first_step"]


class State:
    step = 1


def test_each_phase_takes_the_time_since_the_last_mark_and_only_the_first_step_is_written(monkeypatch, tmp_path):
    clock_now = iter([110.0, 112.5, 113.0, 130.0, 131.0])
    monkeypatch.setattr(startup_mod.time, "time", lambda: next(clock_now))
    lines = []
    clock = StartupClock(started_at=100.0)
    clock.mark("imports")
    clock.mark("data")
    clock.attach(tmp_path, lines.append)
    clock.mark("model")
    assert clock.works_at(1) and clock.row is None
    clock.on_step_end(State(), None)
    assert not clock.works_at(2)  # the loop waits for the GPU before the first step's mark only
    clock.on_step_end(State(), None)  # a later step: nothing more
    clock.close()
    rows = [json.loads(ln) for ln in (tmp_path / layout.STARTUP).read_text().splitlines()]
    assert rows == [{"step": 1, "started_at": 100.0, "time_to_first_step_s": 30.0,
                     "phases_s": {"imports": 10.0, "data": 2.5, "model": 0.5, "first_step": 17.0}}]
    assert lines == ["step 1 done 30.0 s after start: first step 17.0 s, imports 10.0 s, data 2.5 s, model 0.5 s"]


def test_without_a_process_start_the_clock_starts_when_made(monkeypatch):
    monkeypatch.setattr(startup_mod, "process_start_time", lambda: None)
    before = time.time()
    assert before <= StartupClock().started_at <= time.time()


def test_a_cpu_run_writes_its_phases_in_order_and_they_add_up(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    monkeypatch.setattr(startup_mod, "_process_start_taken", False)  # as in a fresh process
    t0 = time.time()
    assert train_main(fast_args(runs, "st", steps=3)) == 0  # --quiet: the row is written, not printed
    t1 = time.time()
    assert " s after start: " not in capsys.readouterr().out
    (row,) = [json.loads(ln) for ln in (runs / "st" / layout.STARTUP).read_text().splitlines()]
    assert row["step"] == 1 and list(row["phases_s"]) == PHASES
    assert all(v >= 0 for v in row["phases_s"].values())
    assert sum(row["phases_s"].values()) == pytest.approx(row["time_to_first_step_s"])
    # it starts at the process's start (before this test ran) and ends at the first step, inside train_main
    assert row["started_at"] < t0 and t0 - row["started_at"] < row["time_to_first_step_s"] < t1 - row["started_at"]
    # a second run in the same process starts at its own call, not at the process's start again
    assert train_main(fast_args(runs, "again", steps=2)) == 0
    (again,) = [json.loads(ln) for ln in (runs / "again" / layout.STARTUP).read_text().splitlines()]
    assert t1 <= again["started_at"] <= again["started_at"] + again["time_to_first_step_s"] <= time.time()


def test_status_shows_the_row_and_survives_a_malformed_one(tmp_path):
    runs = tmp_path / "runs"
    assert train_main(fast_args(runs, "st", steps=2)) == 0
    s = status.summarize(runs / "st")
    assert s["startup"]["step"] == 1 and "startup    step 1 done " in status.render_text(s)
    (runs / "st" / layout.STARTUP).write_text("not json\n" + json.dumps({"step": "x", "phases_s": {"data": "slow",
                                                                                                   "model": 2}}) + "\n")
    damaged = status.summarize(runs / "st")
    assert startup_line(damaged["startup"]) == "step n/a done n/a s after start: model 2.0 s"
    assert "startup    step n/a done n/a s after start: model 2.0 s" in status.render_text(damaged)
    (runs / "st" / layout.STARTUP).write_text("")  # a process that has not finished its first step yet
    assert "startup    none yet" in status.render_text(status.summarize(runs / "st"))
