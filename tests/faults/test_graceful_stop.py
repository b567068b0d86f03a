"""Graceful stop: SIGINT / SIGTERM save a checkpoint at the next step boundary, exit 0 and say how to
resume; resuming with the printed command matches the uninterrupted run. A second Ctrl-C aborts at
once, even mid-write, and leaves no half checkpoint."""

import re
import signal

import pytest

from bitnet.model import checkpoint_fit
from bitnet.run import checkpoint
from tests.faults.harness import BASE, assert_matches_reference, train

STOP_MESSAGE = re.compile(r"stopped at step (\d+) \((SIG\w+)\); checkpoint saved\. Resume with:\n\s+bitnet-train "
                          r"--resume-from (\S+)")


@pytest.mark.parametrize("name,sig", [("sigint", "SIGINT"), ("sigterm", "SIGTERM")])
def test_signal_checkpoints_at_the_next_step_and_the_printed_resume_matches(name, sig, scenario, reference):
    r = scenario(name)
    assert r["reached"] and r["returncode"] == 0, r["stderr"]
    assert "Traceback" not in r["stderr"]
    found = STOP_MESSAGE.search(r["stdout"])
    assert found and found[2] == sig, r["stdout"]
    step, path = int(found[1]), found[3]
    # the signal came after step 5 was logged; the stop is at the first step boundary after it (step 5's own
    # boundary when the signal lands before the loop's stop check, a later one otherwise), the last step
    # logged, and it is checkpointed
    assert 5 <= step < BASE["num_steps"] and r["last_logged"] == step
    assert step in r["complete"] and r["tmp_dirs"] == []
    assert checkpoint_fit.load(path)["step"] == step

    assert train(["--resume-from", path, "--runs-dir", str(r["runs"]), "--quiet"]) == 0
    run_id = r["run"].name
    assert_matches_reference(r["runs"] / f"{run_id}_r{step}", reference, step + 1)


def test_second_sigint_aborts_mid_write_and_keeps_the_previous_checkpoint(scenario):
    r = scenario("double_sigint_mid_write")
    assert r["reached"] and r["returncode"] == 130, r["stderr"]
    assert r["stderr"].strip().splitlines()[-1] == "interrupted" and "Traceback" not in r["stderr"]
    assert r["tmp_dirs"] == [] and r["complete"] == [0, 4]  # the half-done step 8 was removed, step 4 intact
    assert checkpoint_fit.load(r["run"])["step"] == 4
