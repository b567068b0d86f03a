"""`--resume-from auto` / `latest`: the newest intact checkpoint of a run and its continuations,
skipping truncated or corrupt ones with a one-line warning; each resume starts a new run directory
X_r<step>; with nothing to resume, one line and nothing written."""

import os
import shutil

import pytest

from bitnet.run import checkpoint, layout
from bitnet.run.directory import base_run_id, continuation_id, run_family
from tests.faults.harness import assert_matches_reference, checkpoint_steps, train, tree


def copy_run(reference, runs, run_id, keep=None):
    """A copy of the reference run under runs/run_id, with only the checkpoints of `keep` (all if None)."""
    dst = runs / run_id
    shutil.copytree(reference, dst)
    for step in checkpoint_steps(dst):
        if keep is not None and step not in keep:
            shutil.rmtree(dst / "checkpoints" / layout.step_dir_name(step))
    return dst


def auto(runs, run_id, how="auto"):
    return ["--resume-from", how, "--run-id", run_id, "--runs-dir", str(runs), "--quiet"]


def test_auto_skips_truncated_and_corrupt_checkpoints_with_a_warning(reference, tmp_path, capsys):
    runs = tmp_path / "runs"
    run = copy_run(reference, runs, "A", keep={12, 16, 20, 24})
    ckpts = run / "checkpoints"
    pt = ckpts / "step_000024" / "checkpoint.pt"
    os.truncate(pt, pt.stat().st_size // 2)  # a disk that filled after the rename, a bad copy
    (ckpts / "step_000020" / "meta.json").write_text('{"step": 20, "sha')  # torn manifest
    shutil.copytree(ckpts / "step_000016", ckpts / "step_000022.tmp")  # complete-looking, never renamed
    assert train(auto(runs, "A", "latest")) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: skipping checkpoint: ") for line in err), err
    assert "step_000024" in err[0] and "corrupt or truncated" in err[0]
    assert "step_000020" in err[1] and "incomplete" in err[1]
    assert_matches_reference(runs / "A_r16", reference, 17)


def test_auto_follows_the_run_and_its_continuations(reference, tmp_path, capsys):
    runs = tmp_path / "runs"
    copy_run(reference, runs, "B", keep={8, 12})
    copy_run(reference, runs, "B_r12", keep={16, 20})  # an earlier resume that was killed after step 20
    copy_run(reference, runs, "Bx", keep={24})  # another run whose name merely starts the same
    assert [d.name for d in run_family(runs, "B")] == ["B", "B_r12"]
    assert train(auto(runs, "B")) == 0
    assert_matches_reference(runs / "B_r20", reference, 21)
    # the same command again: the family's newest checkpoint is now the final one
    before = tree(runs)
    capsys.readouterr()
    assert train(auto(runs, "B_r12")) == 2  # any member's id names the family
    err = capsys.readouterr().err
    assert err == "error: checkpoint is at step 24, not before --num-steps 24: nothing to do\n", err
    assert tree(runs) == before


def test_resume_from_a_run_directory_names_the_new_run_after_it(reference, tmp_path):
    runs = tmp_path / "runs"
    copy_run(reference, runs, "C", keep={4, 20})
    assert train(["--resume-from", str(runs / "C"), "--runs-dir", str(runs), "--quiet"]) == 0
    # named after the run id the checkpoint recorded (C is a copy of the run "ref") and its step
    assert_matches_reference(runs / "ref_r20", reference, 21)


@pytest.mark.parametrize("argv_tail,message", [
    (["--run-id", "empty"], "error: no intact checkpoint of run 'empty' (or its continuations) in "),
    (["--run-id", "never-ran"], "error: no intact checkpoint of run 'never-ran' (or its continuations) in "),
    ([], "error: --resume-from auto needs --run-id, the run to continue"),
    (["--run-id", "../up"], "error: invalid --run-id '../up'"),
])
def test_auto_with_nothing_to_resume_is_one_line_and_writes_nothing(argv_tail, message, tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "empty" / "meta").mkdir(parents=True)
    (runs / "empty" / "checkpoints" / "step_000004.tmp").mkdir(parents=True)  # killed during its first save
    before = tree(tmp_path)
    assert train(["--resume-from", "auto", "--runs-dir", str(runs), "--quiet"] + argv_tail) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert tree(tmp_path) == before


def test_continuation_ids(tmp_path):
    assert base_run_id("X") == base_run_id("X_r500") == base_run_id("X_r500-2") == "X"
    assert base_run_id("X_rerun") == "X_rerun"
    assert continuation_id(tmp_path, "X", 500) == "X_r500"
    (tmp_path / "X_r500").mkdir()
    (tmp_path / "X_r500-2").mkdir()
    assert continuation_id(tmp_path, "X_r100", 500) == "X_r500-3"  # never reuses a directory
