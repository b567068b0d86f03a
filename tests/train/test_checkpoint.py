"""Checkpoints: atomic, checksummed, safe to load, pruned by retention, milestones kept."""

import json
import os

import pytest
import torch

from bitnet.cli.train import train_main
from bitnet.model import ModelConfig, Transformer, checkpoint_fit
from bitnet.run import checkpoint
from tests.conftest import fast_args, read_rows


def state(step):
    return {"model": {"w": torch.full((4,), float(step))}, "step": step, "tokens": step * 10}


def test_save_is_atomic_and_latest_skips_incomplete(tmp_path):
    checkpoint.save(tmp_path, 1, state(1))
    checkpoint.save(tmp_path, 2, state(2))
    # a crash mid-save leaves only a .tmp directory, which is never taken for a checkpoint
    tmp = tmp_path / "checkpoints" / "step_000003.tmp"
    tmp.mkdir()
    (tmp / "checkpoint.pt").write_bytes(b"half")
    assert checkpoint.latest(tmp_path).name == "step_000002"
    # a truncated checkpoint.pt under a step name is detected by its checksum and skipped
    pt = tmp_path / "checkpoints" / "step_000002" / "checkpoint.pt"
    pt.write_bytes(pt.read_bytes()[:50])
    with pytest.warns(UserWarning, match="corrupt or truncated"):
        assert checkpoint.latest(tmp_path).name == "step_000001"
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        checkpoint_fit.load(pt)
    assert checkpoint_fit.load(tmp_path)["step"] == 1  # a run dir resolves to its newest valid checkpoint


def test_failed_save_keeps_previous(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, state(1))

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, 2, state(2))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_000001"]
    assert checkpoint_fit.load(tmp_path)["step"] == 1


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil(), "step": 1}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not a safe bitnet checkpoint"):
        checkpoint_fit.load(path)


def test_retention_keeps_last_k_and_milestones(runs):
    # 20 steps, a checkpoint every 2, keep the last 2; boundary at 10 -> milestones 0 (the initial weights),
    # 9, 10 and 20
    assert train_main(fast_args(runs, "ret", steps=20, checkpoint_interval=2, keep_last=2)) == 0
    steps = [s for s, _ in checkpoint.list_checkpoints(runs / "ret")]
    assert steps == [0, 9, 10, 16, 18, 20]
    metas = {s: json.loads((d / "meta.json").read_text()) for s, d in checkpoint.list_checkpoints(runs / "ret")}
    assert [s for s, m in metas.items() if m["milestone"]] == [0, 9, 10, 20]
    ck = checkpoint_fit.load(runs / "ret" / "checkpoints" / "step_000010")
    assert set(ck) >= {"model", "optimizer", "train_state", "rng", "config", "step", "tokens"}
    assert ck["train_state"]["data"]["index"] == 10 * 4  # ten steps of 4 windows consumed


def test_manifest_records_the_file_size_and_prune_never_shows_a_half_deleted_step(tmp_path, monkeypatch):
    for step in range(1, 5):
        checkpoint.save(tmp_path, step, state(step))
    root = tmp_path / "checkpoints"
    for step, d in checkpoint.list_checkpoints(tmp_path):
        assert json.loads((d / "meta.json").read_text())["bytes"] == (d / "checkpoint.pt").stat().st_size > 0
    seen = []
    real_rmtree = checkpoint.shutil.rmtree

    def watching_rmtree(path, *a, **k):  # what a reader listing the directory sees as each one is deleted
        if os.path.exists(path):
            seen.append(sorted(os.listdir(root)))
        return real_rmtree(path, *a, **k)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", watching_rmtree)
    (root / "step_000000.deleting").mkdir()  # left by a crash mid-prune: removed by the next prune
    removed = checkpoint.prune(tmp_path, keep_last=2)
    assert [d.name for d in removed] == ["step_000001", "step_000002"]
    assert sorted(os.listdir(root)) == ["step_000003", "step_000004"]
    # while each pruned directory was deleted, it no longer had its step name
    assert seen[0] == ["step_000000.deleting", "step_000001.deleting", "step_000002", "step_000003", "step_000004"]
    assert "step_000002.deleting" in seen[1] and "step_000002" not in seen[1]


def test_a_leftover_of_the_same_name_does_not_stop_the_rename(tmp_path, monkeypatch):
    for step in (1, 2):
        checkpoint.save(tmp_path, step, state(step))
    root = tmp_path / "checkpoints"
    (root / "step_000001.deleting").mkdir()
    (root / "step_000001.deleting" / "checkpoint.pt").write_bytes(b"old")  # not empty: a rename onto it fails
    renamed = []
    real_rename = checkpoint.os.rename
    monkeypatch.setattr(checkpoint.os, "rename", lambda a, b: renamed.append((a.name, b.name)) or real_rename(a, b))
    checkpoint.prune(tmp_path, keep_last=1)
    assert renamed == [("step_000001", "step_000001.deleting")] and sorted(os.listdir(root)) == ["step_000002"]
    checkpoint.save(tmp_path, 2, state(2))  # saving a step again replaces it the same way
    assert ("step_000002", "step_000002.deleting") in renamed and sorted(os.listdir(root)) == ["step_000002"]


def test_old_checkpoints_keep_the_anomaly_memory_in_train_state():
    """Before the "hooks" table, the anomaly detector's memory was train_state["anomaly"]: a resume still reads it."""
    from bitnet.train.state import TrainState, saved_hook_states

    memory = {"losses": [1.0, 2.0], "dumps": 1}
    old = {"train_state": {"step": 5, "tokens": 40, "data": {"pos": 3}, "anomaly": memory}}
    assert saved_hook_states(old) == {"anomaly": memory}
    assert saved_hook_states({"train_state": {**old["train_state"], "anomaly": {}}}) == {}
    new = {"train_state": {"step": 5, "tokens": 40}, "hooks": {"anomaly": {"losses": [3.0]}}}
    assert saved_hook_states(new) == {"anomaly": {"losses": [3.0]}}
    state = TrainState()
    state.load_state_dict(old["train_state"])
    assert (state.step, state.tokens, state.data) == (5, 40, {"pos": 3})
    assert "anomaly" not in state.state_dict()


def test_step_0_holds_the_initial_weights_and_resumes_to_the_same_run(runs):
    assert train_main(fast_args(runs, "s0", steps=4)) == 0
    ck = checkpoint_fit.load(runs / "s0" / "checkpoints" / "step_000000")
    assert ck["step"] == 0 and ck["tokens"] == 0 and ck["train_state"]["data"]["index"] == 0
    model = Transformer(ModelConfig.from_dict(ck["config"]["model"]))
    model.init_weights(seed=ck["config"]["train"]["seed"])
    assert all(torch.equal(ck["model"][k], v) for k, v in model.state_dict().items())  # as initialized
    # resuming from step 0 replays the whole run: the same per-step losses, bit for bit
    assert train_main(["--resume-from", str(runs / "s0" / "checkpoints" / "step_000000"), "--run-id", "s0b",
                       "--runs-dir", str(runs), "--quiet"]) == 0
    losses = [[r["loss"] for r in read_rows(runs / run / "metrics" / "scalars.jsonl")] for run in ("s0", "s0b")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert checkpoint.list_checkpoints(runs / "s0b")[0][0] > 0  # a resumed run writes no step 0 of its own
