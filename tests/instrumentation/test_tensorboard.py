"""TensorBoard mirror: tails the run files, waits for a torn last line, needs the package only when used."""

import json

import pytest

from bitnet.instrumentation.tensorboard import TensorBoardHook


def test_tails_files_and_waits_for_torn_lines(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = tmp_path / "metrics" / "scalars.jsonl"
    scalars.parent.mkdir()
    row = lambda step: json.dumps({"step": step, "loss": 10.0 - step, "lr": 1e-3, "note": "x"})  # noqa: E731
    scalars.write_text(row(1) + "\n" + row(2)[:10])  # step 2 still being written
    hook = TensorBoardHook(tmp_path)
    hook.on_log(None, {})
    with open(scalars, "a") as f:
        f.write(row(2)[10:] + "\n")
    hook.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 9.0), (2, 8.0)]
    assert "train/note" not in acc.Tags()["scalars"]
