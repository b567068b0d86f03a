"""SIGKILL the trainer (a real process) at several moments; the newest complete checkpoint loads, and
`--resume-from auto` from it reproduces the uninterrupted run's per-step losses bit for bit.

Checkpoints of BASE: every 4 steps plus the milestones 11, 12 (stage boundary) and 24 (last step).
"""

import signal

import pytest
import torch

from bitnet.model import checkpoint_fit
from bitnet.run import checkpoint, layout
from tests.faults.harness import BASE, assert_matches_reference, train, tree

# scenario -> (run id, newest complete checkpoint after the kill)
KILLS = {
    "kill_mid_checkpoint_write": ("k_write", 4),
    "kill_right_after_rename": ("k_rename", 8),
    "kill_mid_step": ("k_step", 12),
    "kill_during_final_checkpoint": ("k_final", 12),
}


@pytest.mark.parametrize("name", KILLS)
def test_sigkill_then_auto_resume_matches_the_uninterrupted_run(name, scenario, reference):
    run_id, expected = KILLS[name]
    r = scenario(name)
    assert r["reached"] and r["returncode"] == -signal.SIGKILL, r["stderr"]
    run = r["run"]

    # what the kill left: only renamed directories count; a complete-looking .tmp is never taken
    assert checkpoint.latest(run).name == layout.step_dir_name(expected)
    if name == "kill_mid_checkpoint_write":
        assert r["tmp_dirs"] == ["step_000008.tmp"] and r["complete"] == [0, 4]
    if name == "kill_during_final_checkpoint":  # every step ran; only the unfinished final save is lost
        assert r["tmp_dirs"] == ["step_000024.tmp"] and r["last_logged"] == BASE["num_steps"]
    if name == "kill_mid_step":
        assert r["last_logged"] > expected
    state = checkpoint_fit.load(run)
    assert state["step"] == expected and state["train_state"]["data"]["index"] == expected * BASE["batch_size"]

    # the user's restart command: the config comes from the checkpoint, the run continues in a new dir
    killed_files = tree(run)
    assert train(["--resume-from", "auto", "--run-id", run_id, "--runs-dir", str(r["runs"]), "--quiet"]) == 0
    resumed = r["runs"] / f"{run_id}_r{expected}"
    assert_matches_reference(resumed, reference, expected + 1)
    assert tree(run) == killed_files  # the killed run's files are left as they were

    final, want = (checkpoint_fit.load(d / "checkpoints" / "step_000024") for d in (resumed, reference))
    for key, tensor in want["model"].items():
        assert torch.equal(final["model"][key], tensor), key
    # the anomaly detector's memory too; its copies of scalars rows hold wall-clock fields, left out
    got_anomaly, want_anomaly = final["hooks"]["anomaly"], want["hooks"]["anomaly"]
    assert final["train_state"] == want["train_state"]
    for key in ("losses", "grad_norms", "per_step", "events", "collapsed", "dumps"):
        assert got_anomaly[key] == want_anomaly[key], key
    assert [r["loss"] for r in got_anomaly["rows"]] == [r["loss"] for r in want_anomaly["rows"]]

