"""Security: a checkpoint is data, never code; config files are parsed, never evaluated; nothing the
trainer is given makes it write outside <runs_dir>/<run_id>. (That the status tool never writes is
tests/test_status.py's.)"""

import hashlib
import json

import pytest
import torch

from bitnet.model import checkpoint_fit
from bitnet.run import checkpoint
from tests.faults.harness import flags, train, tree
from tests.faults.scenarios import Payload


def test_checkpoint_with_a_pickled_callable_is_refused_even_with_a_valid_manifest(reference, tmp_path, capsys):
    # A real checkpoint plus one object whose unpickling runs a command, placed where --resume-from auto
    # looks, with a meta.json whose sha256 matches: the checksum proves integrity, not safety.
    marker = tmp_path / "pwned"
    state = checkpoint_fit.load(reference / "checkpoints" / "step_000004")
    state["train_state"]["note"] = Payload(marker)
    step_dir = tmp_path / "runs" / "evil" / "checkpoints" / "step_000004"
    step_dir.mkdir(parents=True)
    torch.save(state, step_dir / "checkpoint.pt")
    sha = hashlib.sha256((step_dir / "checkpoint.pt").read_bytes()).hexdigest()
    (step_dir / "meta.json").write_text(json.dumps({"step": 4, "sha256": sha}))
    before = tree(tmp_path)
    assert train(["--resume-from", "auto", "--run-id", "evil", "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load checkpoint ") and "not a safe bitnet checkpoint" in err, err
    assert err.count("\n") == 1 and not marker.exists()
    assert tree(tmp_path) == before


@pytest.mark.parametrize("payload", [
    "seed: !!python/object/apply:os.system ['touch {marker}']\n",
    "seed: !!python/object/new:subprocess.Popen [['touch', '{marker}']]\n",
    "!!python/name:os.system\n",
])
def test_yaml_config_is_parsed_never_evaluated(payload, tmp_path, capsys):
    marker = tmp_path / "pwned"
    config = tmp_path / "run.yaml"
    config.write_text(payload.format(marker=marker))
    assert train(flags(tmp_path / "runs", "y", config=config)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot parse config file {config}") and err.count("\n") == 1, err
    assert not marker.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("run_id", ["../../outside", "/tmp/outside", "a/b", "..", ".", "a\\..\\..\\b", "-rf"])
def test_run_id_from_a_config_file_cannot_climb_out(run_id, tmp_path, capsys):
    (tmp_path / "work").mkdir()
    config = tmp_path / "work" / "run.toml"
    config.write_text(f"run_id = {json.dumps(run_id)}\n")
    before = tree(tmp_path)
    assert train(flags(tmp_path / "work" / "runs", None, config=config)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid --run-id") and err.count("\n") == 1, err
    assert tree(tmp_path) == before


def test_paths_stored_in_a_checkpoint_do_not_steer_writes(reference, tmp_path):
    # run_id and runs_dir of a checkpoint's config are never taken over: the user's --runs-dir decides
    state = checkpoint_fit.load(reference / "checkpoints" / "step_000020")
    elsewhere = tmp_path / "elsewhere"
    state["config"]["train"].update(run_id="../../escaped", runs_dir=str(elsewhere), overwrite=True)
    torch.save(state, tmp_path / "crafted.pt")
    runs = tmp_path / "work" / "runs"
    assert train(["--resume-from", str(tmp_path / "crafted.pt"), "--runs-dir", str(runs), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.pt", "work"]
    (new_run,) = runs.iterdir()  # a default id, since the recorded one is not a valid run id
    assert (new_run / "checkpoints" / "step_000024").is_dir()


def test_overwrite_does_not_follow_a_symlinked_run_dir(tmp_path, capsys):
    outside = tmp_path / "outside"
    (outside / "meta").mkdir(parents=True)
    (outside / "meta" / "precious.txt").write_text("keep me")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "link").symlink_to(outside)
    before = tree(outside)
    assert train(flags(tmp_path / "runs", "link", overwrite=True)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert tree(outside) == before
