"""Disk full / unwritable during a checkpoint: the previous checkpoint survives. Policy
(--on-checkpoint-error): stop (default) ends the run with one line and exit 1; continue warns and
trains on, but the final checkpoint must still be written."""

import errno
import os
import re

import pytest
import torch

from bitnet.model import checkpoint_fit
from bitnet.run import checkpoint, layout
from tests.faults.harness import BASE, assert_matches_reference, flags, logged_steps, train

REAL_SAVE, REAL_RENAME = torch.save, os.rename


def fail_writes(monkeypatch, steps_full=(), steps_readonly=()):
    """Disk full while writing checkpoint.pt of `steps_full` (half a file, then ENOSPC); a read-only
    file system at the rename of `steps_readonly` (EROFS). Every other write goes through."""

    def save(obj, f, *args, **kwargs):
        name = str(getattr(f, "name", f))
        if any(f"{layout.step_dir_name(s)}.tmp" in name for s in steps_full):
            f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return REAL_SAVE(obj, f, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        if any(str(src).endswith(f"{layout.step_dir_name(s)}.tmp") for s in steps_readonly):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
        return REAL_RENAME(src, dst, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(os, "rename", rename)


@pytest.mark.parametrize("how", ["disk full", "read-only"])
def test_failed_checkpoint_stops_with_one_line_and_keeps_the_previous(how, monkeypatch, tmp_path, capsys, reference):
    runs = tmp_path / "runs"
    fail_writes(monkeypatch, **({"steps_full": [8]} if how == "disk full" else {"steps_readonly": [8]}))
    assert train(flags(runs, "full")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    reason = "No space left on device" if how == "disk full" else "Read-only file system"
    kept = runs / "full" / "checkpoints" / "step_000004"
    assert err == (f"error: checkpoint of step 8 could not be written ({reason}); newest intact checkpoint: {kept}; "
                   f"resume with: bitnet-train --resume-from {kept} --runs-dir {runs}\n")
    assert sorted(os.listdir(runs / "full" / "checkpoints")) == ["step_000000", "step_000004"]  # no half step_000008(.tmp)
    assert logged_steps(runs / "full") == list(range(1, 9))  # it stopped at once
    survivor, want = checkpoint_fit.load(kept), checkpoint_fit.load(reference / "checkpoints" / "step_000004")
    assert all(torch.equal(survivor["model"][k], v) for k, v in want["model"].items())


def test_continue_policy_trains_on_and_retries_at_the_next_checkpoint(monkeypatch, tmp_path, capsys, reference):
    runs = tmp_path / "runs"
    fail_writes(monkeypatch, steps_full=[8], steps_readonly=[16])
    assert train(flags(runs, "cont", keep_last=100, on_checkpoint_error="continue")) == 0
    out = capsys.readouterr().out
    warned = re.findall(r"warning: checkpoint of step (\d+) could not be written \(([^)]*)\); newest intact "
                        r"checkpoint: \S+; training goes on", out)
    assert warned == [("8", "No space left on device"), ("16", "Read-only file system")], out
    # no step 8 or 16, and no temp directory left behind by either failure
    assert sorted(os.listdir(runs / "cont" / "checkpoints")) == [f"step_{s:06d}" for s in [0, 4, 11, 12, 20, 24]]
    assert_matches_reference(runs / "cont", reference, 1)  # failed saves change nothing in training


def test_continue_policy_still_fails_when_the_final_checkpoint_cannot_be_written(monkeypatch, tmp_path, capsys):
    runs = tmp_path / "runs"
    fail_writes(monkeypatch, steps_full=[BASE["num_steps"]])
    assert train(flags(runs, "last", on_checkpoint_error="continue")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint of step 24 could not be written (No space left on device); "
                          "newest intact checkpoint: ") and err.count("\n") == 1, err
    assert checkpoint.latest(runs / "last").name == "step_000020"


def test_disk_full_outside_a_checkpoint_is_one_line_and_exit_1(monkeypatch, tmp_path, capsys):
    # the scalars file hits a full disk at step 6: the run stops, naming the intact step-4 checkpoint
    from bitnet.instrumentation.jsonl import JsonlWriter

    real_write = JsonlWriter.write

    def write(self, row):
        if self.path.name == "scalars.jsonl" and row.get("step") == 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return real_write(self, row)

    monkeypatch.setattr(JsonlWriter, "write", write)
    runs = tmp_path / "runs"
    assert train(flags(runs, "scalars")) == 1
    err = capsys.readouterr().err
    scalars = runs / "scalars" / "metrics" / "scalars.jsonl"
    assert err == (f"error: No space left on device ({scalars}) at step 6; newest intact checkpoint: "
                   f"{runs / 'scalars' / 'checkpoints' / 'step_000004'}\n"), err
