"""bitnet-status on a real run that was SIGKILLed and resumed with --resume-from auto (CPU trainer, tiny).

The stage-2 LR is set absurdly high, so the loss spikes right after the stage boundary (steps 59/60,
the milestone checkpoints) and the anomaly detector dumps loss_spike events. The trainer is killed a
few steps after the first dump; the resumed leg redoes those steps bit for bit on the CPU and dumps the
same events again. The status of the continuation covers both legs and counts each event once.
"""

import json
import signal

import pytest

from bitnet import status
from bitnet.cli import status as status_cli
from bitnet.instrumentation import startup as startup_clock
from bitnet.run import layout
from tests.faults.harness import Trainer, checkpoint_steps, flags, last_logged_step, rows, train

NUM_STEPS = 120  # stage boundary at 60


def spikes(run) -> list[tuple[int, str]]:
    """(step, event) of the run's finished anomaly dumps (one being written has a temporary name)."""
    d = run / "anomalies"
    found = [layout.ANOMALY_DIR.match(p.name) for p in d.iterdir()] if d.is_dir() else []
    return sorted((int(m.group(1)), m.group(2)) for m in found if m)


def test_status_joins_the_legs_of_a_killed_and_resumed_run(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    argv = flags(runs, "st", num_steps=NUM_STEPS, checkpoint_interval=1000, lr_stage2_start=0.3)
    trainer = Trainer(argv, tmp_path / "logs")
    first = runs / "st"
    reached = trainer.wait_for(lambda: spikes(first) and last_logged_step(first) >= spikes(first)[0][0] + 3)
    assert reached and trainer.kill() == -signal.SIGKILL, trainer.stderr
    killed_at = last_logged_step(first)
    resume_step = max(checkpoint_steps(first))
    assert resume_step == NUM_STEPS // 2 < spikes(first)[0][0] < killed_at < NUM_STEPS

    monkeypatch.setattr(startup_clock, "_process_start_taken", False)  # the resume runs here, as in a fresh process
    assert train(["--resume-from", "auto", "--run-id", "st", "--runs-dir", str(runs), "--quiet"]) == 0
    second = runs / f"st_r{resume_step}"
    redone = [a for a in spikes(first) if a[0] > resume_step]
    assert redone and set(redone) <= set(spikes(second))  # the CPU redoes the steps and their events exactly

    s = status.summarize(second)
    assert [(leg["run_id"], leg["resumed_step"]) for leg in s["legs"]] == [("st", None), (second.name, resume_step)]
    assert s["step"] == NUM_STEPS and s["finished"] and s["rows"] == NUM_STEPS
    assert s["tokens"] == rows(second)[-1]["tokens"]
    every = set(spikes(first)) | set(spikes(second))
    assert s["anomalies"]["count"] == len(every) and s["anomalies"]["repeated_after_resume"] == len(redone)

    # elapsed: each leg from its process start to its last row; the tokens from 0
    a, b = rows(first), rows(second)
    provs = [json.loads((leg / "meta/provenance.json").read_text()) for leg in (first, second)]
    start_a, start_b = (p["process_start_time"] for p in provs)  # before imports: earlier than provenance
    assert all(p["process_start_time"] < p["start_time"] for p in provs)
    elapsed = (a[-1]["time"] - start_a) + (b[-1]["time"] - start_b)
    assert abs(s["elapsed_s"] - elapsed) < 1e-6 and start_a < a[0]["time"] and start_b < b[0]["time"]
    assert abs(s["tok_s_sustained"] - b[-1]["tokens"] / elapsed) < 1e-6

    # each process's time to its first step: the resumed one's first step is the one after its checkpoint,
    # and it writes no step_000000
    startups = [json.loads((leg / layout.STARTUP).read_text()) for leg in (first, second)]
    assert [r["step"] for r in startups] == [1, resume_step + 1] and s["startup"] == startups[1]
    assert "initial_checkpoint" in startups[0]["phases_s"] and "initial_checkpoint" not in startups[1]["phases_s"]
    assert startups[1]["started_at"] == pytest.approx(start_b, abs=0.05)  # /proc ticks: 10 ms

    assert status_cli.main([str(second)]) == 0
    out = capsys.readouterr().out
    assert f"startup    step {resume_step + 1} done " in out
    assert "(2 legs)" in out and f"(steps 1-{killed_at}, redone after {resume_step})" in out
    assert f"({len(redone)} dumped again by a resumed leg, counted once)" in out
    killed = status.summarize(first)
    assert killed["continued_in"] == [second.name] and killed["stalled"] is False

    # the trainer's checkpoints look sound to the monitor; one cut short (a disk fault, a partial copy) does not
    assert s["checkpoints"]["broken"] == [] and s["checkpoints"]["latest_step"] == NUM_STEPS
    newest = second / "checkpoints" / f"step_{NUM_STEPS:06d}" / "checkpoint.pt"
    size = newest.stat().st_size
    newest.write_bytes(newest.read_bytes()[:1000])
    cut = status.summarize(second)["checkpoints"]
    sound = [st for st in checkpoint_steps(first) if st <= resume_step] + checkpoint_steps(second)
    assert cut["latest_step"] == max(st for st in sound if st != NUM_STEPS)
    assert cut["broken"] == [{"name": f"step_{NUM_STEPS:06d}",
                              "problem": f"checkpoint.pt has 1,000 bytes, meta.json records {size:,}"}]
    assert status_cli.main([str(second)]) == 0
    assert f"BROKEN     1 checkpoint(s), not usable to resume: step_{NUM_STEPS:06d} (checkpoint.pt has 1,000 bytes" \
        in capsys.readouterr().out
